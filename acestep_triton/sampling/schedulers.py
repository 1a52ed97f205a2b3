"""Flow-matching schedules and steps (euler, heun, pingpong), as ACE-Step v1 runs them.

Sigmas go from 1 (noise) to 0 (clean); the model predicts the velocity v with
x_{sigma} = (1 - sigma) * x_0 + sigma * noise. Numerics follow upstream
bit for bit on CPU float32:

- The schedule is shifted twice at its low end: the 1000-entry training table
  is shifted (sigma' = 3s / (1 + 2s)) to find sigma_min, then the linspace
  between sigma_max and that sigma_min is shifted again (float64, then cast).
- `oss_steps` picks timesteps of a max(oss_steps)-step schedule and shifts
  those a third time (float32), which is what upstream does.
- Euler and Heun rescale each update around its mean by
  omega = 0.9 + 0.2 / (1 + exp(-0.1 * omega_scale)). Upstream takes the mean over
  the whole batch tensor; here it is taken per item, so an item does not depend
  on the other seeds of its request (identical for one item, upstream's only case).
- Heun needs 2N - 1 model evaluations for N steps (each timestep but the first
  is evaluated twice); the last evaluation is a plain first-order step to 0.
- Pingpong re-noises every step, the last one included. Upstream draws the whole
  batch from the first item's generator; here each item draws from its own, again
  so that a seed gives the same music whatever it is batched with (identical for
  one item).

Sigmas stay on the CPU as 0-d tensors: they enter device math as scalars, so a
step never waits on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0


@dataclass(frozen=True)
class Schedule:
    """Timesteps [n] (one per model evaluation, in [0, 1000]) and sigmas [n + 1] (ending in 0).

    `num_inference_steps` is the step count upstream's guidance interval is
    measured in: N for euler/pingpong and for heun (whose n is 2N - 1), and
    len(oss_steps) with oss_steps.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    num_inference_steps: int


def _shift(sigmas, shift: float = SHIFT):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigma_range(sigma_max: float = 1.0) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the shifted float32 training table, as Python floats.

    The table runs from 1 to sigma_max * 1000 (upstream's `sigma_max` argument: audio2audio passes
    1 - ref_audio_strength), divided by 1000 and shifted in float32, so its sigma_max is the
    argument shifted once (0.5 -> 0.75).
    """
    ends = torch.tensor([sigma_max * NUM_TRAIN_TIMESTEPS, 1.0]) / NUM_TRAIN_TIMESTEPS
    shifted_max, shifted_min = _shift(ends).tolist()
    return shifted_max, shifted_min


def _linspace_sigmas(num_steps: int, sigma_max: float = 1.0) -> torch.Tensor:
    """[num_steps] float32 sigmas of the plain schedule (the second shift applied in float64)."""
    shifted_max, shifted_min = training_sigma_range(sigma_max)
    timesteps = np.linspace(shifted_max * NUM_TRAIN_TIMESTEPS, shifted_min * NUM_TRAIN_TIMESTEPS, num_steps)
    return torch.from_numpy(_shift(timesteps / NUM_TRAIN_TIMESTEPS)).to(torch.float32)


def flow_match_schedule(scheduler_type: str, infer_step: int, oss_steps: Sequence[int] = (),
                        sigma_max: float = 1.0) -> Schedule:
    """The timesteps and sigmas upstream's scheduler holds after `retrieve_timesteps`.

    With `oss_steps` the run has len(oss_steps) steps at the (1-based) indices
    `oss_steps` of a max(oss_steps)-step schedule, re-shifted; `infer_step` is
    then ignored, as upstream does. The arguments are a validated request's (contract.validate).
    `sigma_max` < 1 is audio2audio's partial schedule (training_sigma_range): its steps run from
    the twice-shifted sigma_max down; upstream never combines it with oss_steps.
    """
    if oss_steps:
        picked = _linspace_sigmas(max(oss_steps))[[s - 1 for s in oss_steps]] * NUM_TRAIN_TIMESTEPS
        sigmas = _shift(picked / NUM_TRAIN_TIMESTEPS)
        num_inference_steps = len(oss_steps)
    else:
        sigmas = _linspace_sigmas(infer_step, sigma_max)
        num_inference_steps = infer_step
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if scheduler_type == "heun":
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    return Schedule(timesteps, sigmas, num_inference_steps)


def omega_weight(omega_scale: float) -> float:
    """Upstream's logistic map of `omega_scale` to the update weight in (0.9, 1.1)."""
    low, high = 0.9, 1.1
    return low + (high - low) / (1 + math.exp(-0.1 * omega_scale))


def _mean_rescaled(sample: torch.Tensor, update: torch.Tensor, omega: float) -> torch.Tensor:
    mean = torch.stack([item.mean() for item in update]).reshape(-1, *([1] * (update.dim() - 1)))
    return sample + ((update - mean) * omega + mean)


class EulerScheduler:
    """First-order step x += dsigma * v, mean-rescaled by omega."""

    def __init__(self, schedule: Schedule, omega_scale: float) -> None:
        self.sigmas = schedule.sigmas
        self.omega = omega_weight(omega_scale)
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """velocity, sample [B, C, H, T] at evaluation `index` -> sample at the next sigma."""
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        update = (sigma_next - sigma) * velocity
        self.index += 1
        return _mean_rescaled(sample.float(), update, self.omega).to(velocity.dtype)


class HeunScheduler:
    """Second-order (Heun) step over evaluation pairs; the final evaluation is first-order."""

    def __init__(self, schedule: Schedule, omega_scale: float) -> None:
        self.sigmas = schedule.sigmas
        self.omega = omega_weight(omega_scale)
        self.index = 0
        self._first_derivative: torch.Tensor | None = None
        self._first_sample: torch.Tensor | None = None
        self._dt: torch.Tensor | None = None

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """velocity, sample [B, C, H, T] at evaluation `index` -> the next model input."""
        sample = sample.float()
        if self._dt is None:
            sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
            denoised = sample - velocity * sigma
            derivative = (sample - denoised) / sigma
            dt = sigma_next - sigma
            self._first_derivative, self._first_sample, self._dt = derivative, sample, dt
        else:
            sigma_next = self.sigmas[self.index]
            denoised = sample - velocity * sigma_next
            derivative = 0.5 * (self._first_derivative + (sample - denoised) / sigma_next)
            dt, sample = self._dt, self._first_sample
            self._first_derivative = self._first_sample = self._dt = None
        self.index += 1
        return _mean_rescaled(sample, derivative * dt, self.omega).to(velocity.dtype)


class PingPongScheduler:
    """Jump to the predicted x_0, then re-noise to the next sigma with fresh noise."""

    def __init__(self, schedule: Schedule, generators: Sequence[torch.Generator]) -> None:
        self.sigmas = schedule.sigmas
        self.generators = list(generators)
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """velocity, sample [B, C, H, T] -> sample at the next sigma; item b draws its noise from generators[b]."""
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        sample = sample.float()
        denoised = sample - sigma * velocity
        noise = pingpong_noise(self.generators, sample)
        self.index += 1
        return ((1 - sigma_next) * denoised + sigma_next * noise).to(velocity.dtype)


def pingpong_noise(generators: Sequence[torch.Generator], sample: torch.Tensor) -> torch.Tensor:
    """Fresh noise like `sample` [B, ...] as upstream's pingpong draws it (`empty_like(...).normal_`),
    item b from generators[b], on the sample's device."""
    if len(generators) != sample.shape[0]:
        raise ValueError(f"pingpong: {len(generators)} generators for {sample.shape[0]} items")
    noise = torch.cat([torch.empty((1, *sample.shape[1:]), dtype=sample.dtype).normal_(generator=g)
                       for g in generators])
    if sample.is_cuda:  # pinned memory lets the copy overlap instead of waiting for the device
        noise = noise.pin_memory().to(sample.device, non_blocking=True)
    return noise


FlowMatchScheduler = EulerScheduler | HeunScheduler | PingPongScheduler


def make_scheduler(
    scheduler_type: str, schedule: Schedule, omega_scale: float, generators: Sequence[torch.Generator]
) -> FlowMatchScheduler:
    """The stepper for `scheduler_type`; pingpong draws item b's noise from generators[b]."""
    if scheduler_type == "euler":
        return EulerScheduler(schedule, omega_scale)
    if scheduler_type == "heun":
        return HeunScheduler(schedule, omega_scale)
    if scheduler_type == "pingpong":
        return PingPongScheduler(schedule, generators)
    raise ValueError(f"unknown scheduler_type {scheduler_type!r} (contract.validate lets none through)")
