"""The `dit_step` batch of one loop step, from the encoded conditions of a request.

Shared by the in-process pipeline and the Triton `diffusion` model (BLS), so both send
`dit_step` the same rows: branch-major, N = len(branches) * items (see sampling.loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from acestep_triton.contract import NULL
from acestep_triton.specs import ERG_Q_SCALE


@dataclass(frozen=True)
class Conditions:
    """Encoder states per guidance branch: states [K, L, D], mask [K, L], row k is branches[k]."""

    branches: tuple[str, ...]
    states: torch.Tensor
    mask: torch.Tensor


def branch_inputs(
    conditions: Conditions, branches: Sequence[str], items: int, frames: int, use_erg_diffusion: bool
) -> dict[str, torch.Tensor]:
    """The `dit_step` inputs that depend only on the branches of a step (rows branch-major,
    N = len(branches) * items), on the conditions' device: the same for every step with these branches.

    ERG-diffusion weakens only the NULL rows, as upstream's hooks do on the uncond pass.
    """
    device = conditions.states.device
    rows = torch.tensor([conditions.branches.index(b) for b in branches]).repeat_interleave(items)
    q_scale = torch.tensor(
        [ERG_Q_SCALE if (b == NULL and use_erg_diffusion) else 1.0 for b in branches]
    ).repeat_interleave(items)
    rows = rows.to(device)
    return {
        "ATTENTION_MASK": torch.ones(rows.shape[0], frames, device=device),
        "ENCODER_STATES": conditions.states[rows],
        "ENCODER_MASK": conditions.mask[rows],
        "Q_SCALE": q_scale.reshape(-1, 1).to(device),
    }
