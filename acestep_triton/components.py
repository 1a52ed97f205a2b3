"""The five neural components as modules whose forward is exactly their spec (acestep_triton.specs).

forward takes the spec's inputs positionally, in spec order, and returns its outputs as a
tuple in spec order. The same module is run by the in-process pipeline, by the Triton python
models (`pytorch` engine) and exported to ONNX, so all three compute one function.
"""

from __future__ import annotations

import torch
from torch import nn

from acestep_triton.audio import resample
from acestep_triton.checkpoint import Checkpoint
from acestep_triton.contract import OUTPUT_SAMPLE_RATE
from acestep_triton.models.dcae import latents_to_mel, load_dcae
from acestep_triton.models.text_encoder import TextEncoder
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.models.vocoder import ADaMoSHiFiGAN

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
    """One denoising decode: LATENTS [B,8,16,T] ... -> VELOCITY [B,8,16,T]."""

    def __init__(self, transformer: ACEStepTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale):
        velocity = self.transformer.decode(
            latents, attention_mask, encoder_states, encoder_mask, timestep[:, 0], q_scale=q_scale[:, 0]
        )
        return (velocity,)


class DcaeDecoderComponent(nn.Module):
    """LATENTS [B,8,16,T] -> MEL [B,2,128,8T] (ACE-Step log-mel)."""

    def __init__(self, dcae) -> None:
        super().__init__()
        self.dcae = dcae

    def forward(self, latents: torch.Tensor):
        return (latents_to_mel(self.dcae, latents),)


class VocoderComponent(nn.Module):
    """MEL [B,2,128,F] -> WAVEFORM [B,2,N] at 48 kHz; both channels in one vocoder call."""

    def __init__(self, vocoder: ADaMoSHiFiGAN) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel: torch.Tensor):
        wave = self.vocoder.decode_channels(mel)
        return (resample(wave, self.vocoder.config.sampling_rate, OUTPUT_SAMPLE_RATE),)


def load_component(name: str, ckpt: Checkpoint, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load one component from its published folder, in eval mode on `device`."""
    if name == "text_encoder":
        module = TextEncoderComponent(TextEncoder.from_pretrained(ckpt.text_encoder))
    elif name in ("condition_encoder", "dit_step"):
        transformer = ACEStepTransformer.from_pretrained(ckpt.transformer)
        module = ConditionEncoderComponent(transformer) if name == "condition_encoder" else DiTStepComponent(transformer)
    elif name == "dcae_decoder":
        module = DcaeDecoderComponent(load_dcae(ckpt.dcae))
    elif name == "vocoder":
        module = VocoderComponent(ADaMoSHiFiGAN.from_pretrained(ckpt.vocoder))
    else:
        raise KeyError(f"unknown component {name!r}")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
