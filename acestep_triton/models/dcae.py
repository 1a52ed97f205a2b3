"""The `music_dcae_f8c8` component: diffusers `AutoencoderDC` between stereo log-mel and diffusion latents.

The autoencoder treats a stereo log-mel [B, 2, n_mels, F] as a 2-channel image and compresses both
axes by `spatial_compression_ratio` (8): latents are [B, 8, n_mels/8, F/8]. ACE-Step normalises
on both sides with its own constants (the AutoencoderDC `scaling_factor` in the config is unused):

    latents = (encoder(mel_norm) - LATENT_SHIFT) * LATENT_SCALE
    mel_norm = ((log_mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC

from acestep_triton.audio import resample
from acestep_triton.models.vocoder import ADaMoSHiFiGAN

LATENT_SCALE = 0.1786
LATENT_SHIFT = -1.9091
MEL_MIN = -11.0
MEL_MAX = 3.0


def load_dcae(folder: str | Path) -> AutoencoderDC:
    """Load the published `music_dcae_f8c8/` folder unchanged (config.json + diffusion_pytorch_model.safetensors)."""
    return AutoencoderDC.from_pretrained(folder).eval()


@torch.no_grad()
def latents_to_mel(dcae: AutoencoderDC, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C_lat, H, T] -> log-mel [B, in_channels, H*r, T*r] (r = spatial_compression_ratio)."""
    mel_norm = dcae.decoder(latents / LATENT_SCALE + LATENT_SHIFT)
    return (mel_norm * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


@torch.no_grad()
def audio_to_latents(
    dcae: AutoencoderDC, vocoder: ADaMoSHiFiGAN, audio: torch.Tensor, sample_rate: int
) -> torch.Tensor:
    """Audio [B, in_channels, N] at `sample_rate` -> latents [B, C_lat, n_mels/r, ceil(N'/(r*hop))].

    N' is N resampled to the vocoder rate; the audio is zero-padded at the end to whole latent
    frames (r*hop samples), so a partial last frame still yields a latent frame.
    """
    channels = dcae.config.in_channels
    if audio.ndim != 3 or audio.shape[1] != channels:
        raise ValueError(f"audio: expected [batch, {channels}, samples], got shape {tuple(audio.shape)}")
    audio = resample(audio, sample_rate, vocoder.config.sampling_rate)
    samples_per_latent = dcae.spatial_compression_ratio * vocoder.config.hop_length
    audio = torch.nn.functional.pad(audio, (0, -audio.shape[-1] % samples_per_latent))
    mel = vocoder.log_mel(audio.flatten(0, 1)).unflatten(0, audio.shape[:2])
    mel_norm = ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5
    return (dcae.encoder(mel_norm) - LATENT_SHIFT) * LATENT_SCALE
