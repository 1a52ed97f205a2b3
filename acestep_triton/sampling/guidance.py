"""Classifier-free guidance variants and the guidance interval, as ACE-Step v1 applies them.

All tensors are velocities [B, C, H, T]. Upstream quirks kept on purpose:

- Guidance runs only for loop indices start <= i < end of the interval
  (`guidance_interval`), measured in `num_inference_steps` even for heun whose
  loop has 2N - 1 evaluations; outside it the step is a single "cond" pass.
  Guidance is off entirely when guidance_scale is 0 or 1.
- APG keeps one momentum buffer per generation (momentum -0.75), updated on
  guided steps only; the running difference is clamped to norm 2.5 over
  (H, T) per item and channel and projected against cond in float64.
- cfg_star returns zeros on guided steps with global index i <= 1.
- Double-condition guidance (guidance_scale_text > 1 and guidance_scale_lyric
  > 1) replaces cfg_type, the decay and cfg_star's zero init.
- Decay: scale - (scale - min_scale) * progress * decay with progress going
  0 -> 1 over the interval. Upstream divides by zero when the interval holds a
  single step; here that step gets progress 0 (the full guidance_scale).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from acestep_triton.contract import COND, NO_LYRIC, NULL, GenerationParams, uses_double_condition, uses_guidance

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
CFG_STAR_ZERO_STEPS = 1
_PER_CHANNEL_DIMS = [-1, -2]


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classic CFG: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


class MomentumBuffer:
    """APG's running average of (cond - uncond): avg = diff + momentum * avg."""

    def __init__(self, momentum: float = APG_MOMENTUM) -> None:
        self.momentum = momentum
        self.average: torch.Tensor | None = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.average = diff if self.average is None else diff + self.momentum * self.average
        return self.average


def _orthogonal_part(v: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """v minus its projection on `direction`, per item and channel, computed in float64."""
    v64 = v.double()
    unit = F.normalize(direction.double(), dim=_PER_CHANNEL_DIMS)
    parallel = (v64 * unit).sum(dim=_PER_CHANNEL_DIMS, keepdim=True) * unit
    return (v64 - parallel).to(v.dtype)


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, momentum: MomentumBuffer) -> torch.Tensor:
    """Adaptive projected guidance (eta 0): cond + (scale - 1) * the clamped momentum diff orthogonal to cond."""
    diff = momentum.update(cond - uncond)
    norm = diff.norm(p=2, dim=_PER_CHANNEL_DIMS, keepdim=True)
    diff = diff * torch.clamp(APG_NORM_THRESHOLD / norm, max=1.0)
    return cond + (scale - 1) * _orthogonal_part(diff, cond)


def cfg_star(cond: torch.Tensor, uncond: torch.Tensor, scale: float, step_index: int) -> torch.Tensor:
    """CFG-Zero*: uncond rescaled by the per-item optimal alpha; zeros for step_index <= CFG_STAR_ZERO_STEPS."""
    if step_index <= CFG_STAR_ZERO_STEPS:
        return torch.zeros_like(cond)
    batch = cond.shape[0]
    cond_flat, uncond_flat = cond.reshape(batch, -1), uncond.reshape(batch, -1)
    dot = torch.sum(cond_flat * uncond_flat, dim=1, keepdim=True)
    alpha = (dot / (torch.sum(uncond_flat**2, dim=1, keepdim=True) + 1e-8)).view(batch, 1, 1, 1)
    return uncond * alpha + scale * (cond - uncond * alpha)


def double_condition(
    cond: torch.Tensor, no_lyric: torch.Tensor, uncond: torch.Tensor, scale_text: float, scale_lyric: float
) -> torch.Tensor:
    """Separate text and lyric guidance: (1-gt)*uncond + (gt-gl)*no_lyric + gl*cond."""
    return (1 - scale_text) * uncond + (scale_text - scale_lyric) * no_lyric + scale_lyric * cond


def guidance_interval(num_inference_steps: int, interval: float) -> tuple[int, int]:
    """[start, end) of the guided loop indices, centred on the schedule."""
    return int(num_inference_steps * ((1 - interval) / 2)), int(num_inference_steps * (interval / 2 + 0.5))


class Guidance:
    """Per-step guidance for one generation: which branches to evaluate, and how to combine them.

    Holds the APG momentum, so use one instance per generation and call
    `combine` once per step in order.
    """

    def __init__(self, params: GenerationParams, num_inference_steps: int) -> None:
        self.params = params
        self.enabled = uses_guidance(params)
        self.double_condition = uses_double_condition(params)
        self.start, self.end = guidance_interval(num_inference_steps, params.guidance_interval)
        self.momentum = MomentumBuffer()

    def is_guided(self, step_index: int) -> bool:
        return self.enabled and self.start <= step_index < self.end

    def branches(self, step_index: int) -> tuple[str, ...]:
        """Condition labels the model must be evaluated with at `step_index`, in upstream's call order."""
        if not self.is_guided(step_index):
            return (COND,)
        return (COND, NO_LYRIC, NULL) if self.double_condition else (COND, NULL)

    def scale(self, step_index: int) -> float:
        """guidance_scale at `step_index`, linearly decayed toward min_guidance_scale over the interval."""
        p = self.params
        if p.guidance_interval_decay <= 0:
            return p.guidance_scale
        span = self.end - self.start - 1
        progress = (step_index - self.start) / span if span > 0 else 0.0
        return p.guidance_scale - (p.guidance_scale - p.min_guidance_scale) * progress * p.guidance_interval_decay

    def combine(self, step_index: int, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The guided velocity [B, C, H, T] from the raw outputs of `branches(step_index)`."""
        if not self.is_guided(step_index):
            return outputs[COND]
        p = self.params
        cond, uncond = outputs[COND], outputs[NULL]
        if self.double_condition:
            return double_condition(cond, outputs[NO_LYRIC], uncond, p.guidance_scale_text, p.guidance_scale_lyric)
        scale = self.scale(step_index)
        if p.cfg_type == "apg":
            return apg(cond, uncond, scale, self.momentum)
        if p.cfg_type == "cfg":
            return cfg(cond, uncond, scale)
        return cfg_star(cond, uncond, scale, step_index)
