"""The `music_dcae_f8c8` component: diffusers `AutoencoderDC` between stereo log-mel and diffusion latents.

The autoencoder treats a stereo log-mel [B, 2, n_mels, F] as a 2-channel image and compresses both
axes by `spatial_compression_ratio` (8): latents are [B, 8, n_mels/8, F/8]. ACE-Step normalises
on both sides with its own constants (the AutoencoderDC `scaling_factor` in the config is unused):

    latents = (encoder(mel_norm) - LATENT_SHIFT) * LATENT_SCALE
    mel_norm = ((log_mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from torch import nn

from acestep_triton.audio import resample
from acestep_triton.checkpoint import VOCODER_DIR
from acestep_triton.models.vocoder import LogMelSpectrogram, load_log_mel, overlapping_windows, run_grouped

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


def load_audio_encoder(folder: str | Path) -> AudioEncoder:
    """The encoder half of the published `music_dcae_f8c8/` folder, with the log-mel front end of the
    `music_vocoder/` folder beside it (the published layout keeps them side by side; upstream's
    MusicDCAE loads both the same way). The decoder half is dropped."""
    folder = Path(folder)
    dcae = load_dcae(folder)
    log_mel = load_log_mel(folder.parent / VOCODER_DIR)
    return AudioEncoder(dcae.encoder, log_mel, dcae.spatial_compression_ratio * log_mel.spectrogram.hop_length)


def encoder_audio(samples: torch.Tensor, sample_rate: int, target_rate: int, channels: int) -> torch.Tensor:
    """Decoded audio [C, N] at `sample_rate` -> [1, channels, N'] at `target_rate`: what upstream's
    `MusicDCAE.load_audio` and the resampling in `encode` hand to the mel front end.

    Mono is duplicated to stereo (load_audio); the resampler is torchaudio's `Resample` with its
    float64-built kernel (acestep_triton.audio), skipped when the rates match.
    """
    if samples.ndim != 2 or samples.shape[0] not in (1, channels):
        raise ValueError(f"audio: expected [1 or {channels} channels, samples], got shape {tuple(samples.shape)}")
    if samples.shape[0] == 1:
        samples = samples.repeat(channels, 1)
    return resample(samples.float(), sample_rate, target_rate)[None]


class AudioEncoder(nn.Module):
    """Audio at the vocoder's sample rate [B, C, N] -> latents [B, C_lat, n_mels/r, ceil(N / samples_per_latent)].

    Upstream's `MusicDCAE.encode` after its resampling: the audio is zero-padded at the end to whole
    latent frames (`samples_per_latent` = r * hop samples, so a partial last frame still yields a
    latent frame), each channel goes through the vocoder's log-mel, the mel is normalised to
    [-1, 1], encoded, shifted and scaled.

    The log-mel stays float32 on any device whatever the encoder's dtype: it is held outside the
    module's registered children, so `.to(dtype)` does not reach it (in bfloat16 its window and
    filterbank round so that the log moves quiet bins by up to 2.4, on the golden source), and it
    follows the audio's device instead.
    """

    def __init__(self, encoder: nn.Module, log_mel: LogMelSpectrogram, samples_per_latent: int) -> None:
        super().__init__()
        self.encoder = encoder
        self._front_end = (log_mel.float(),)
        self.samples_per_latent = samples_per_latent

    def mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [B, C, N] -> padded log-mel [B, C, n_mels, ceil(N / samples_per_latent) * r] in float32."""
        log_mel = self._front_end[0]
        if log_mel.spectrogram.window.device != audio.device:
            log_mel.to(audio.device)
        audio = F.pad(audio.float(), (0, -audio.shape[-1] % self.samples_per_latent))
        return log_mel(audio.flatten(0, 1)).unflatten(0, audio.shape[:2])

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        mel = self.mel(audio)
        mel_norm = ((mel - MEL_MIN) / (MEL_MAX - MEL_MIN) - 0.5) / 0.5
        z = self.encoder(mel_norm.to(next(self.encoder.parameters()).dtype))
        return (z - LATENT_SHIFT) * LATENT_SCALE


def decoder_context_frames(dcae: AutoencoderDC) -> int:
    """Latent frames on each side that can change the output of the decoder's local part.

    The decoder's deepest stage (EfficientViT blocks: ReLU linear attention over the whole latent
    image) is global, so windows cannot cut through it; everything after it (per stage: an
    upsampling block with one 3x3 conv, ResBlocks of two 3x3 convs each, then per-pixel norm and
    a 3x3 conv out) only reaches 3x3 neighbourhoods, at 2, 4, 8... pixels per latent frame. Summed
    and rounded up, plus one frame for the nearest-neighbour upsampling's alignment.
    """
    config = dcae.config
    types, layers = config.decoder_block_types, config.decoder_layers_per_block
    if any(kind != "ResBlock" for kind in types[:-1]):
        raise ValueError(f"decoder_block_types: only the deepest stage may attend globally, got {list(types)}")
    reach = 0.0
    for stage, depth in enumerate(reversed(layers[:-1]), start=1):
        reach += (1 + 2 * depth) / 2**stage
    reach += 1 / 2 ** (len(layers) - 1)  # conv_out
    return math.ceil(reach) + 1


def decode_global_part(dcae: AutoencoderDC, latents: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
    """Latents [B, C_lat, H, T] -> the deepest stage's output [B, C_deep, H, T]: conv_in and the
    globally attending EfficientViT blocks, which must see the whole signal.

    With `chunk_frames` the blocks run chunk by chunk along T (`efficientvit_chunked`): the same
    result up to float32 summation order, with the blocks' working memory bounded by the chunk
    instead of growing with T (~3.3 GiB whole at 240 s in bf16, most of the DCAE's peak)."""
    decoder = dcae.decoder
    hidden = latents / LATENT_SCALE + LATENT_SHIFT
    shortcut = hidden.repeat_interleave(decoder.in_shortcut_repeats, dim=1) if decoder.in_shortcut else 0
    hidden = decoder.conv_in(hidden) + shortcut
    if chunk_frames is None or hidden.shape[-1] <= chunk_frames:
        return decoder.up_blocks[-1](hidden)
    for block in decoder.up_blocks[-1]:
        hidden = efficientvit_chunked(block, hidden, chunk_frames)
    return hidden


def _attention_heads(attn, x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of `SanaMultiscaleLinearAttention` at frames [start, stop) of x [B, C, H, T],
    as its processor lays them out: [B, heads, head_dim, H * (stop - start)] float32, ReLU applied
    to query and key. The multi-scale depthwise convolutions reach `reach` frames to each side, so
    the projections are computed over that much more of x (zero padding only at x's own ends)."""
    reach = max((scale.proj_in.kernel_size[-1] // 2 for scale in attn.to_qkv_multiscale), default=0)
    frames = x.shape[-1]
    first, last = max(0, start - reach), min(frames, stop + reach)
    rows = x[..., first:last].movedim(1, -1)
    qkv = torch.cat([attn.to_q(rows), attn.to_k(rows), attn.to_v(rows)], dim=-1).movedim(-1, 1)
    scales = torch.cat([qkv, *(scale(qkv) for scale in attn.to_qkv_multiscale)], dim=1)
    scales = scales[..., start - first : stop - first].float()
    heads = scales.reshape(x.shape[0], -1, 3 * attn.attention_head_dim, x.shape[2] * (stop - start))
    query, key, value = heads.chunk(3, dim=2)
    return attn.nonlinearity(query), attn.nonlinearity(key), value


def efficientvit_chunked(block, x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """One diffusers `EfficientViTBlock` (ReLU linear attention, then a GLUMBConv) on x [B, C, H, T],
    `chunk_frames` frames at a time; equal to `block(x)` up to float32 summation order.

    The attention is global only through its key-value sums: out_n = (V' K^T) q_n, with V' the
    values with a row of ones appended (its last row is the normaliser). Pass 1 adds V' K^T up
    chunk by chunk (float32, as the processor computes it); pass 2 applies it to each chunk's
    queries, then the output projection, norm and residual, and the GLUMBConv, whose 3x3 depthwise
    convolution needs `reach` frames of attention output beyond the chunk on each side. Every
    other operation is per position, or a convolution reaching a few frames (the multi-scale
    projections, see `_attention_heads`).
    """
    attn, feed_forward = block.attn, block.conv_out
    if attn.residual_connection is not True or not feed_forward.residual_connection:
        raise ValueError("efficientvit_chunked: expected residual attention and feed-forward (the DCAE's blocks)")
    frames, height = x.shape[-1], x.shape[2]
    if height * frames <= attn.attention_head_dim:  # the processor attends quadratically there: run it whole
        raise ValueError(f"{frames} frames: the block attends quadratically at this size, run it whole")
    reach = feed_forward.conv_depth.kernel_size[-1] // 2
    chunks = [(start, min(frames, start + chunk_frames)) for start in range(0, frames, chunk_frames)]
    key_values = None
    for start, stop in chunks:
        _, key, value = _attention_heads(attn, x, start, stop)
        part = torch.nn.functional.pad(value, (0, 0, 0, 1), value=1.0) @ key.transpose(-1, -2)
        key_values = part if key_values is None else key_values + part
    out = torch.empty_like(x)
    for start, stop in chunks:
        first, last = max(0, start - reach), min(frames, stop + reach)
        query, _, _ = _attention_heads(attn, x, first, last)
        hidden = key_values @ query
        hidden = (hidden[:, :, :-1] / (hidden[:, :, -1:] + attn.eps)).to(x.dtype)
        hidden = attn.to_out(hidden.reshape(x.shape[0], -1, height, last - first).movedim(1, -1)).movedim(-1, 1)
        if attn.norm_type == "rms_norm":
            hidden = attn.norm_out(hidden.movedim(1, -1)).movedim(-1, 1)
        else:
            hidden = attn.norm_out(hidden)
        hidden = feed_forward(hidden + x[..., first:last])
        out[..., start:stop] = hidden[..., start - first : stop - first]
    return out


def decode_local_part(dcae: AutoencoderDC, hidden: torch.Tensor) -> torch.Tensor:
    """`decode_global_part`'s output (or a window of it along T) -> log-mel [B, in_channels, H*r, T*r]:
    the upsampling stages, norm and conv out (local: see `decoder_context_frames`)."""
    decoder = dcae.decoder
    for up_block in reversed(decoder.up_blocks[:-1]):
        hidden = up_block(hidden)
    hidden = decoder.norm_out(hidden.movedim(1, -1)).movedim(-1, 1)
    mel_norm = decoder.conv_out(decoder.conv_act(hidden))
    return (mel_norm * 0.5 + 0.5) * (MEL_MAX - MEL_MIN) + MEL_MIN


@torch.no_grad()
def latents_to_mel_windowed(
    dcae: AutoencoderDC,
    latents: torch.Tensor,
    window_frames: int,
    decode_local: Callable[[torch.Tensor], torch.Tensor] | None = None,
    window_batch: int | None = None,
    global_chunk_frames: int | None = None,
) -> torch.Tensor:
    """`latents_to_mel` with the decoder's memory-heavy local part run over windows of `window_frames`
    latent frames: equal to the whole decode up to rounding, memory bounded by the window, one
    window shape for any length.

    The global part (conv_in + EfficientViT attention, at latent resolution: small) runs whole;
    its output is cut into windows overlapping by `decoder_context_frames` on each side, the
    windows of all items are stacked and run `window_batch` at a time through `decode_local`
    (default: `decode_local_part`; the gpu profile passes a CUDA-graph replay of it), and their
    centres are joined. `global_chunk_frames` bounds the global part's memory too
    (`decode_global_part`). Latents [B, C_lat, H, T] -> log-mel [B, in_channels, H*r, T*r].
    """
    run = decode_local if decode_local is not None else partial(decode_local_part, dcae)
    hidden = decode_global_part(dcae, latents, global_chunk_frames)
    total = hidden.shape[-1]
    if total <= window_frames:
        return decode_local_part(dcae, hidden)
    spans = overlapping_windows(total, window_frames, decoder_context_frames(dcae))
    windows = torch.stack([hidden[..., start : start + window_frames] for start, _, _ in spans], dim=1)
    mels = run_grouped(windows.flatten(0, 1), run, window_batch).unflatten(0, (hidden.shape[0], len(spans)))
    ratio = dcae.spatial_compression_ratio
    pieces = [mels[:, index, ..., (kept - start) * ratio : (keep_to - start) * ratio]
              for index, (start, kept, keep_to) in enumerate(spans)]
    return torch.cat(pieces, dim=-1)
