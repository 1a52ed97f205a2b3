"""The five neural components as modules whose forward is exactly their spec (acestep_triton.specs).

forward takes the spec's inputs positionally, in spec order, and returns its outputs as a
tuple in spec order. The same module is run by the in-process pipeline, by the Triton python
models (`pytorch` engine) and exported to ONNX, so all three compute one function.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from acestep_triton.audio import resample
from acestep_triton.checkpoint import Checkpoint
from acestep_triton.contract import OUTPUT_SAMPLE_RATE
from acestep_triton.models.dcae import decode_local_part, latents_to_mel, latents_to_mel_windowed, load_dcae
from acestep_triton.models.text_encoder import TextEncoder
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.models.vocoder import ADaMoSHiFiGAN, load_vocoder
from acestep_triton.specs import NEURAL_COMPONENTS

SPEAKER_EMBEDDING_DIM = 512


class TextEncoderComponent(nn.Module):
    """TEXT_IDS [B,Lt], TEXT_MASK [B,Lt], TEXT_Q_SCALE [B,1] -> TEXT_STATES [B,Lt,Dt]."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        # registered so .to(device, dtype) moves the weights and the ERG view's scale buffers
        self.umt5 = text_encoder.model
        self.umt5_erg = text_encoder.erg_model

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, text_q_scale: torch.Tensor):
        return (self.text_encoder.encode_rows(text_ids, text_mask, text_q_scale[:, 0]),)


class ConditionEncoderComponent(nn.Module):
    """One guidance branch per row -> ENCODER_STATES [B,1+Lt+Ll,D], ENCODER_MASK [B,1+Lt+Ll].

    The released checkpoint has no speaker input: the speaker embedding is zeros, as upstream.
    """

    def __init__(self, transformer: ACEStepTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, text_states, text_mask, text_scale, lyric_ids, lyric_mask, lyric_q_scale):
        speaker = text_states.new_zeros(text_states.shape[0], SPEAKER_EMBEDDING_DIM)
        states, mask = self.transformer.encode(
            text_states * text_scale[:, :, None], text_mask, speaker, lyric_ids, lyric_mask,
            lyric_q_scale=lyric_q_scale[:, 0],
        )
        return states, mask.to(states.dtype)


class DiTStepComponent(nn.Module):
    """One denoising decode: LATENTS [B,8,16,T] ... -> VELOCITY [B,8,16,T].

    `decode` is `transformer.decode`; the gpu profile replaces it by a CUDA-graph replay of it.
    """

    def __init__(self, transformer: ACEStepTransformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.decode = transformer.decode

    def forward(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale):
        velocity = self.decode(latents, attention_mask, encoder_states, encoder_mask, timestep[:, 0], q_scale[:, 0])
        return (velocity,)


class DcaeDecoderComponent(nn.Module):
    """LATENTS [B,8,16,T] -> MEL [B,2,128,8T] (ACE-Step log-mel).

    With `window_frames` set, the decoder's local part runs over overlapping windows of that many
    latent frames (dcae.latents_to_mel_windowed: same result up to rounding, bounded memory, one
    window shape), the windows of all items `window_batch` at a time through `decode_window`,
    which the gpu profile replaces by a CUDA-graph replay.
    """

    def __init__(self, dcae, window_frames: int | None = None, window_batch: int | None = None) -> None:
        super().__init__()
        self.dcae = dcae
        self.window_frames = window_frames
        self.window_batch = window_batch
        self.decode_window = partial(decode_local_part, dcae)

    def forward(self, latents: torch.Tensor):
        if self.window_frames is None:
            return (latents_to_mel(self.dcae, latents),)
        return (latents_to_mel_windowed(self.dcae, latents, self.window_frames, self.decode_window,
                                        self.window_batch),)


class VocoderComponent(nn.Module):
    """MEL [B,2,128,F] -> WAVEFORM [B,2,N] at 48 kHz; all items and channels in one vocoder batch.

    With `window_frames` set, long mels are decoded in overlapping windows of that many frames
    (ADaMoSHiFiGAN.decode_windowed: same result, bounded memory, one window shape); the windows of
    every item and channel are stacked and run `window_batch` at a time through `decode_window`,
    which the gpu profile replaces by a CUDA-graph replay. The resampling to 48 kHz runs in float32
    whatever the vocoder's dtype.
    """

    def __init__(self, vocoder: ADaMoSHiFiGAN, window_frames: int | None = None,
                 window_batch: int | None = None) -> None:
        super().__init__()
        self.vocoder = vocoder
        self.window_frames = window_frames
        self.window_batch = window_batch
        self.decode_window = vocoder.decode

    def forward(self, mel: torch.Tensor):
        if self.window_frames is None:
            wave = self.vocoder.decode_channels(mel)
        else:
            wave = self.vocoder.decode_windowed(mel.flatten(0, 1), self.window_frames, self.decode_window,
                                                self.window_batch).reshape(*mel.shape[:2], -1)
        wave = wave.float()
        return (resample(wave, self.vocoder.config.sampling_rate, OUTPUT_SAMPLE_RATE),)


# The ACEStepTransformer submodules each transformer component runs. Loading keeps only those,
# so a process serving one of them holds only its weights on the device (`projectors`, the
# training-only SSL heads, are never kept).
TRANSFORMER_PARTS = {
    "condition_encoder": ("speaker_embedder", "genre_embedder", "lyric_embs", "lyric_encoder", "lyric_proj"),
    "dit_step": ("transformer_blocks", "time_proj", "timestep_embedder", "t_block", "proj_in", "final_layer"),
}


def keep_transformer_parts(transformer: ACEStepTransformer, components) -> ACEStepTransformer:
    """Drop (in place) every submodule that none of `components` runs."""
    kept = {part for name in components for part in TRANSFORMER_PARTS[name]}
    for child, _ in list(transformer.named_children()):
        if child not in kept:
            setattr(transformer, child, None)
    return transformer


def component_module(name: str, model: nn.Module) -> nn.Module:
    """The component `name` around its loaded model (the transformer for both transformer components)."""
    if name == "text_encoder":
        return TextEncoderComponent(model)
    if name == "condition_encoder":
        return ConditionEncoderComponent(model)
    if name == "dit_step":
        return DiTStepComponent(model)
    if name == "dcae_decoder":
        return DcaeDecoderComponent(model)
    if name == "vocoder":
        return VocoderComponent(model)
    raise KeyError(f"unknown component {name!r}; known: {list(NEURAL_COMPONENTS)}")


def load_components(names, ckpt: Checkpoint, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Load components from their published folders, in eval mode on `device`.

    condition_encoder and dit_step share one transformer, pruned to what they run.
    """
    unknown = [name for name in names if name not in NEURAL_COMPONENTS]
    if unknown:
        raise KeyError(f"unknown components {unknown}; known: {list(NEURAL_COMPONENTS)}")
    transformer_users = [name for name in names if name in TRANSFORMER_PARTS]
    models = {}
    if transformer_users:
        transformer = keep_transformer_parts(ACEStepTransformer.from_pretrained(ckpt.transformer), transformer_users)
        models.update(dict.fromkeys(transformer_users, transformer))
    if "text_encoder" in names:
        models["text_encoder"] = TextEncoder.from_pretrained(ckpt.text_encoder)
    if "dcae_decoder" in names:
        models["dcae_decoder"] = load_dcae(ckpt.dcae)
    if "vocoder" in names:
        models["vocoder"] = load_vocoder(ckpt.vocoder)
    return {
        name: component_module(name, models[name]).to(device=device, dtype=dtype).eval().requires_grad_(False)
        for name in names
    }


def load_component(name: str, ckpt: Checkpoint, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load one component from its published folder, in eval mode on `device`."""
    return load_components([name], ckpt, device, dtype)[name]
