"""One inference of an exported graph against the PyTorch module it came from.

The error of an output is max|exported - torch| / max|torch| (relative to the output's range,
so near-zero elements do not blow it up); a component's error is the worst of its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from acestep_triton.specs import ComponentSpec

# float32 graph vs float32 module: what reordered reductions cost (tiny checkpoint: ~1e-6).
PARITY_RTOL = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """Relative error per output at the given input shapes."""

    errors: dict[str, float]
    shapes: dict[str, tuple[int, ...]]

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    def describe(self) -> str:
        shapes = ", ".join(f"{k} {list(v)}" for k, v in self.shapes.items())
        errors = ", ".join(f"{k} {v:.2e}" for k, v in self.errors.items())
        return f"relative error {errors} (inputs {shapes})"


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max|candidate - reference| / max|reference| (absolute error where the reference is all zeros);
    inf when the shapes differ or the candidate has NaN/inf where the reference has none."""
    if tuple(candidate.shape) != tuple(reference.shape):
        return float("inf")
    reference, candidate = reference.double(), candidate.double()
    if not torch.isfinite(candidate).all() and torch.isfinite(reference).all():
        return float("inf")
    scale = reference.abs().max().item() if reference.numel() else 0.0
    diff = (candidate - reference).abs().max().item() if reference.numel() else 0.0
    return diff / scale if scale > 0 else diff


def compare_outputs(spec: ComponentSpec, reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor],
                    inputs: Mapping[str, torch.Tensor]) -> ParityResult:
    """ParityResult for every spec output; a missing output counts as an infinite error."""
    errors = {}
    for t in spec.outputs:
        got = candidate.get(t.name)
        errors[t.name] = float("inf") if got is None else relative_error(reference[t.name], got)
    return ParityResult(errors, {k: tuple(v.shape) for k, v in inputs.items()})
