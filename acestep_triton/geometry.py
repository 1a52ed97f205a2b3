"""The latent geometry: how many latent frames, channels and rows a duration of audio becomes.

Torch-free and free of the package's other modules but the checkpoint layout, so the contract
(the shortest duration), the specs (tensor dims), the sampling loop (noise shape) and the tests
all read it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from acestep_triton.checkpoint import DCAE_DIR, VOCODER_DIR, Checkpoint, CheckpointError


@dataclass(frozen=True)
class LatentGeometry:
    """How the DCAE lays audio out as latents: [channels, height, frames] per item.

    The vocoder's mel has `mel_bins` bands at `sample_rate` / `hop_length` frames per second;
    the DCAE compresses both mel axes by `compression` into `channels` latent channels, and
    decodes `audio_channels` (stereo) mels.
    """

    sample_rate: int
    hop_length: int
    compression: int
    channels: int
    mel_bins: int
    audio_channels: int

    @property
    def height(self) -> int:
        """Latent rows: the mel bands after compression."""
        return self.mel_bins // self.compression

    @property
    def frame_seconds(self) -> float:
        """Seconds of audio per latent frame: the granularity of every duration."""
        return self.hop_length * self.compression / self.sample_rate

    def frames(self, duration_s: float) -> int:
        """Latent frames T for `duration_s` seconds, truncated toward zero like upstream (in double
        precision: -2 s is -21 frames)."""
        return int(duration_s * self.sample_rate / self.hop_length / self.compression)

    def source_frames(self, samples: int, sample_rate: int) -> int:
        """Latent frames the DCAE encodes `samples` samples at `sample_rate` Hz into: resampled to the
        vocoder's rate, then zero-padded at the end to whole latent frames (upstream's encode, so a
        partial last frame counts: 6.000 s at 48 kHz gives 65 frames)."""
        return math.ceil(resampled_length(samples, sample_rate, self.sample_rate) / (self.hop_length * self.compression))


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Samples after resampling `length` samples from `orig_sr` to `new_sr` Hz: ceil(length*new/orig)
    with the rates divided by their gcd, rounded to float32 first as torchaudio's Resample does."""
    if orig_sr == new_sr:
        return length
    g = math.gcd(orig_sr, new_sr)
    return int(np.ceil(np.float32(new_sr // g * length / (orig_sr // g))))


# ACE-Step v1's geometry (music_dcae_f8c8 on music_vocoder's 44.1 kHz, hop-512, 128-band mel),
# for the code that runs without a checkpoint at hand (the sampling loop sizes its noise from
# DURATION alone). `latent_geometry` refuses a checkpoint whose configs give another.
PUBLISHED_GEOMETRY = LatentGeometry(sample_rate=44100, hop_length=512, compression=8, channels=8, mel_bins=128,
                                    audio_channels=2)


def latent_geometry(ckpt: Checkpoint) -> LatentGeometry:
    """The geometry the checkpoint's DCAE and vocoder configs define (CheckpointError if not the published one)."""
    dcae, vocoder = ckpt.config(DCAE_DIR), ckpt.config(VOCODER_DIR)
    geometry = LatentGeometry(
        sample_rate=vocoder["sampling_rate"],
        hop_length=vocoder["hop_length"],
        # the DCAE halves both mel axes once per decoder block after the first
        compression=2 ** (len(dcae["decoder_block_out_channels"]) - 1),
        channels=dcae["latent_channels"],
        mel_bins=vocoder["n_mels"],
        audio_channels=dcae["in_channels"],
    )
    if geometry != PUBLISHED_GEOMETRY:
        raise CheckpointError(f"{ckpt.root}: latent geometry {geometry} differs from ACE-Step v1's "
                              f"{PUBLISHED_GEOMETRY}, which the sampling loop assumes")
    return geometry
