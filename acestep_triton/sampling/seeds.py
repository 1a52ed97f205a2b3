"""Seeds, per-item generators, initial noise and the latent length of a request.

Noise is drawn on the CPU with `torch.Generator("cpu")`, one generator per
batch item, exactly as upstream does, so a seed reproduces upstream's
latents bit for bit; the result is then moved to the compute device.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Sequence

import torch

from acestep_triton.contract import RANDOM_DURATION_RANGE_S, SEED_RANGE
from acestep_triton.geometry import PUBLISHED_GEOMETRY, LatentGeometry


def resolve_seeds(seeds: Sequence[int], batch_size: int | None = None) -> tuple[int, ...]:
    """One seed per batch item (default batch: one item per seed, or one).

    A list shorter than the batch repeats its last seed (upstream's rule). With
    no seeds each item gets a fresh seed from the OS entropy pool; the caller
    reports the returned seeds. (Upstream draws from torch's global RNG, which
    a server process would replay identically after every restart.)
    """
    batch_size = batch_size if batch_size is not None else max(1, len(seeds))
    if not seeds:
        return tuple(secrets.randbelow(SEED_RANGE) for _ in range(batch_size))
    return tuple(int(seeds[min(i, len(seeds) - 1)]) for i in range(batch_size))


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """A CPU generator per item, seeded with that item's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def latent_frames(duration_s: float, geometry: LatentGeometry = PUBLISHED_GEOMETRY) -> int:
    """Latent frames T for `duration_s` seconds (LatentGeometry.frames; ACE-Step v1's geometry by default)."""
    return geometry.frames(duration_s)


def resolve_duration(duration_s: float, seed: int) -> float:
    """`duration_s`, or for a non-positive one (-1 in the contract) a duration in 30-240 s drawn from `seed`.

    Upstream draws it from Python's global `random`; here it comes from
    `random.Random(seed)`, so the same first seed gives the same length.
    """
    if duration_s > 0:
        return float(duration_s)
    low, high = RANDOM_DURATION_RANGE_S
    return random.Random(seed).uniform(low, high)


def initial_noise(
    generators: Sequence[torch.Generator],
    frames: int,
    geometry: LatentGeometry = PUBLISHED_GEOMETRY,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Standard normal latents [B, channels, height, frames] of `geometry`, item b drawn from generators[b].

    contract.validate refuses durations shorter than one frame, so `frames` >= 1 here.
    """
    shape = (1, geometry.channels, geometry.height, frames)
    draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(draws).to(device)
