"""The vocoder stage in chunks, for audio that can be played while later chunks are still decoding.

`acestep_stream` calls the vocoder (through BLS) once per chunk of the mel instead of once for the
whole mel, and sends each chunk's audio as soon as it is decoded. Chunks overlap by the vocoder's
receptive field (models.vocoder.receptive_context_frames) and their boundaries lie where the
vocoder's rate and the output rate line up (44.1 -> 48 kHz: every 147 mel frames), so the
resampler after the vocoder sees each chunk at the phase it has in the whole signal: the pieces
tile the waveform in order and equal one whole vocoder call up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from acestep_triton.contract import OUTPUT_SAMPLE_RATE
from acestep_triton.geometry import PUBLISHED_GEOMETRY, resampled_length
from acestep_triton.models.vocoder import aligned_chunks


def alignment_frames(hop: int, vocoder_rate: int, output_rate: int) -> int:
    """The fewest mel frames whose samples resample to a whole number of output samples at the
    resampler's phase 0 (147 for hop 512, 44.1 -> 48 kHz)."""
    orig_phases = vocoder_rate // math.gcd(vocoder_rate, output_rate)
    return orig_phases // math.gcd(hop, orig_phases)


def vocode_in_chunks(
    mel: torch.Tensor,
    vocode: Callable[[torch.Tensor], torch.Tensor],
    context_frames: int,
    chunk_frames: int,
    hop: int = PUBLISHED_GEOMETRY.hop_length,
    vocoder_rate: int = PUBLISHED_GEOMETRY.sample_rate,
    output_rate: int = OUTPUT_SAMPLE_RATE,
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Yield (offset, piece, total) per chunk of mel [B, C, n_mels, F]: `piece` [B, C, n] holds output
    samples offset..offset+n of the `total` the whole call `vocode(mel)` gives ([B, C, total] at
    `output_rate`); `vocode` takes any slice of the mel's frames."""
    frames = mel.shape[-1]
    total = resampled_length(frames * hop, vocoder_rate, output_rate)

    def output_index(frame: int) -> int:  # exact at aligned frames and at the end
        return total if frame == frames else frame * hop * output_rate // vocoder_rate

    align = alignment_frames(hop, vocoder_rate, output_rate)
    for start, stop, keep_from, keep_to in aligned_chunks(frames, chunk_frames, context_frames, align):
        wave = vocode(mel[..., start:stop])
        first = output_index(start)
        yield output_index(keep_from), wave[..., output_index(keep_from) - first : output_index(keep_to) - first], total
