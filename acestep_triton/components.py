"""The neural components as modules whose forward is exactly their spec (acestep_triton.registry).

forward takes the spec's inputs positionally, in spec order, and returns its outputs as a
tuple in spec order. The same module is run by the in-process pipeline, by the Triton python
models (`pytorch` engine) and exported to ONNX, so all three compute one function.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from acestep_triton.audio import resample
from acestep_triton.checkpoint import Checkpoint
from acestep_triton.condition_cache import ConditionRow, condition_rows, stack_rows
from acestep_triton.contract import OUTPUT_SAMPLE_RATE
from acestep_triton.models.dcae import AudioEncoder, decode_local_part, latents_to_mel, latents_to_mel_windowed
from acestep_triton.models.text_encoder import TextEncoder
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.models.vocoder import ADaMoSHiFiGAN
from acestep_triton.registry import COMPONENTS, component, resolve


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
        speaker = text_states.new_zeros(text_states.shape[0], self.transformer.config.speaker_embedding_dim)
        states, mask = self.transformer.encode(
            text_states * text_scale[:, :, None], text_mask, speaker, lyric_ids, lyric_mask,
            lyric_q_scale=lyric_q_scale[:, 0],
        )
        return states, mask.to(states.dtype)


class DiTStepComponent(nn.Module):
    """One denoising decode: LATENTS [B,8,16,T] ... -> VELOCITY [B,8,16,T].

    `forward` is the spec (what ONNX exports and a direct client sends). Served, the conditions
    are prepared once per request instead (`prepare`: the cross-attention keys/values the decode
    attends to, one ConditionRow per row, kept by dit_step's condition cache) and each step decodes
    from them (`decode_rows`). The gpu profile replaces `decode`, `prepare` and `decode_rows` by
    acceleration.BucketedDecode's CUDA-graph versions of the same functions.
    """

    def __init__(self, transformer: ACEStepTransformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.decode = transformer.decode

    def forward(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale):
        velocity = self.decode(latents, attention_mask, encoder_states, encoder_mask, timestep[:, 0], q_scale[:, 0])
        return (velocity,)

    def prepare(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> list[ConditionRow]:
        """encoder_states [B, S, D], encoder_mask [B, S] -> per row, its keys/values and additive mask."""
        return condition_rows(*self.transformer.prepare_cross_attention(encoder_states, encoder_mask))

    def decode_rows(self, latents: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[ConditionRow],
                    timestep: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """`forward`'s velocity with row b's conditions given as `rows[b]` (from `prepare`); timestep and
        q_scale [B]. Rows of different token counts are padded with masked tokens."""
        keys_values, bias = stack_rows(rows, float("-inf"))
        return self.transformer.decode_prepared(latents, attention_mask, keys_values, bias, timestep, q_scale)


class DcaeEncoderComponent(nn.Module):
    """AUDIO [B,2,N] at the vocoder's sample rate -> LATENTS [B,8,16,ceil(N/4096)] (upstream's MusicDCAE.encode)."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, audio: torch.Tensor):
        return (self.encoder(audio),)


class DcaeDecoderComponent(nn.Module):
    """LATENTS [B,8,16,T] -> MEL [B,2,128,8T] (ACE-Step log-mel).

    With `window_frames` set, the decoder's local part runs over overlapping windows of that many
    latent frames (dcae.latents_to_mel_windowed: same result up to rounding, bounded memory, one
    window shape), the windows of all items `window_batch` at a time through `decode_window`,
    which the gpu profile replaces by a CUDA-graph replay; `global_chunk_frames` (the lowvram
    profile) runs the global part chunk by chunk too.
    """

    def __init__(self, dcae, window_frames: int | None = None, window_batch: int | None = None,
                 global_chunk_frames: int | None = None) -> None:
        super().__init__()
        self.dcae = dcae
        self.window_frames = window_frames
        self.window_batch = window_batch
        self.global_chunk_frames = global_chunk_frames
        self.decode_window = partial(decode_local_part, dcae)

    def forward(self, latents: torch.Tensor):
        if self.window_frames is None:
            return (latents_to_mel(self.dcae, latents),)
        return (latents_to_mel_windowed(self.dcae, latents, self.window_frames, self.decode_window,
                                        self.window_batch, self.global_chunk_frames),)


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


def keep_parts(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Drop (in place) every submodule of a shared model that none of the components `names` runs
    (registry `parts`), so a process serving some of them holds only their weights on the device."""
    kept = {part for name in names for part in component(name).parts}
    for child, _ in list(model.named_children()):
        if child not in kept:
            setattr(model, child, None)
    return model


def load_components(names: Sequence[str], ckpt: Checkpoint, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Load components from their checkpoint folders, in eval mode on `device`.

    Components with the same loader and folder (condition_encoder and dit_step) share one model,
    pruned to the parts they run.
    """
    unknown = [name for name in names if name not in COMPONENTS]
    if unknown:
        raise KeyError(f"unknown components {unknown}; known: {list(COMPONENTS)}")
    users: dict[tuple[str, str], list[str]] = {}
    for name in names:
        users.setdefault((component(name).loader, component(name).folder), []).append(name)
    models = {}
    for (loader, folder), sharing in users.items():
        model = resolve(loader)(ckpt.root / folder)
        if any(component(name).parts for name in sharing):
            model = keep_parts(model, sharing)
        models.update(dict.fromkeys(sharing, model))
    return {
        name: resolve(component(name).module)(models[name]).to(device=device, dtype=dtype).eval().requires_grad_(False)
        for name in names
    }


def load_component(name: str, ckpt: Checkpoint, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load one component from its checkpoint folder, in eval mode on `device`."""
    return load_components([name], ckpt, device, dtype)[name]
