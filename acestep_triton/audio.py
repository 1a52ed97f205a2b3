"""Audio helpers: band-limited resampling (as torchaudio's `Resample` defaults) and WAV I/O.

The resampler reproduces `torchaudio.transforms.Resample(orig, new)` with its defaults
(`sinc_interp_hann`, lowpass width 6, rolloff 0.99): a Hann-windowed sinc kernel per output
phase, built in float64 and rounded to float32, applied as one strided conv1d (polyphase).
"""

from __future__ import annotations

import math
import os
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


@lru_cache(maxsize=8)
def sinc_resample_kernel(orig_sr: int, new_sr: int) -> tuple[torch.Tensor, int]:
    """Kernel [new_phases, 1, 2*width + orig_phases] (float32) and its one-sided width in input samples.

    The phases are the rates divided by their gcd (44100 -> 48000: 147 -> 160). Output phase j
    (time -j/new_phases relative to an input sample) gets taps at input offsets -width .. width+orig_phases-1.
    """
    g = math.gcd(orig_sr, new_sr)
    orig_phases, new_phases = orig_sr // g, new_sr // g
    cutoff = min(orig_phases, new_phases) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig_phases / cutoff)
    taps = torch.arange(-width, width + orig_phases, dtype=torch.float64) / orig_phases
    # torchaudio forms the phase offsets in float32 before adding the float64 taps; keep that rounding.
    phases = torch.arange(0, -new_phases, -1, dtype=torch.float32) / new_phases
    t = (phases[:, None, None] + taps[None, None, :]) * cutoff
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * (window * (cutoff / orig_phases))
    return kernel.to(torch.float32), width


def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Output samples for `length` input samples: ceil(length*new/orig), evaluated in float32 as torchaudio does.

    geometry.resampled_length is the same formula without torch (for the contract's checks); this one
    stays in torch so that a traced or exported graph keeps the length symbolic (numpy would fix it).
    """
    g = math.gcd(orig_sr, new_sr)
    return int(torch.ceil(torch.tensor(new_sr // g * length / (orig_sr // g), dtype=torch.float32)))


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Wave [..., N] at `orig_sr` Hz -> [..., resampled_length(N)] at `new_sr` Hz; returned as is if the rates match."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    kernel, width = sinc_resample_kernel(orig_sr, new_sr)
    orig_phases = orig_sr // math.gcd(orig_sr, new_sr)
    leading, length = wave.shape[:-1], wave.shape[-1]
    flat = F.pad(wave.reshape(-1, 1, length), (width, width + orig_phases))
    out = F.conv1d(flat, kernel.to(device=wave.device, dtype=wave.dtype), stride=orig_phases)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    return out[:, : resampled_length(length, orig_sr, new_sr)].reshape(*leading, -1)


def write_wav(path: str | Path, wave: torch.Tensor, sample_rate: int) -> Path:
    """Write wave [C, N] as a 32-bit float WAV, atomically (temp file in the same folder, then rename)."""
    if wave.ndim != 2:
        raise ValueError(f"wave: expected [channels, samples], got shape {tuple(wave.shape)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    frames = wave.detach().to("cpu", torch.float32).T.contiguous().numpy()
    try:
        soundfile.write(tmp, frames, sample_rate, subtype="FLOAT", format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read any soundfile-supported file -> (wave [C, N] float32, sample rate); samples as stored, no remixing."""
    frames, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(frames.T)), int(sample_rate)
