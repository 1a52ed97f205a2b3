"""The text2music denoising loop, independent of where the transformer runs.

The loop owns the schedule, the guidance plan and the scheduler state; the
transformer is reached only through `step_fn`, which the in-process pipeline
implements with the DiT and the Triton `diffusion` model with a BLS call to
`dit_step`. One `step_fn` call evaluates every guidance branch a step needs.

`step_fn(latents, timestep, branches)`:
  latents  [N, C, H, T] with N = len(branches) * B: the current latents
           repeated once per branch, branch-major (rows k*B .. (k+1)*B - 1
           belong to branches[k]);
  timestep [N] float32 in [0, 1000], on the latents' device;
  branches labels from contract.BRANCHES, in upstream's call order:
           ("cond",) outside the guidance interval, ("cond", "null") inside it,
           ("cond", "no_lyric", "null") with double-condition guidance.
  returns  the raw transformer velocities [N, C, H, T] in the same row order.

Each label names the encoder states to decode with. When use_erg_diffusion is
on, the "null" rows must be decoded with ERG-diffusion (the scaled DiT queries)
and the other rows without; that switch belongs to `step_fn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from acestep_triton.contract import BRANCHES, GenerationParams
from acestep_triton.sampling.guidance import Guidance
from acestep_triton.sampling.schedulers import Schedule, flow_match_schedule, make_scheduler

StepFn = Callable[[torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor]
ProgressFn = Callable[[int, int], None]


def required_branches(params: GenerationParams) -> tuple[str, ...]:
    """Every label a generation with `params` will ask `step_fn` for, so unused conditions need not be encoded."""
    schedule = flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
    guidance = Guidance(params, schedule.num_inference_steps)
    used = {label for i in range(len(schedule.timesteps)) for label in guidance.branches(i)}
    return tuple(label for label in BRANCHES if label in used)


def denoise(
    step_fn: StepFn,
    params: GenerationParams,
    noise: torch.Tensor,
    generators: Sequence[torch.Generator],
    callback: ProgressFn | None = None,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """Run the full schedule from `noise` [B, C, H, T]; returns the final latents [B, C, H, T].

    `generators` are the per-item generators the noise was drawn with (pingpong
    keeps drawing from them). `callback(step_index, total)` runs after
    each step; raising from it aborts the loop (e.g. on cancellation).
    `schedule` replaces the request's (audio2audio's partial one, sampling.tasks).
    """
    schedule = schedule or flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
    scheduler = make_scheduler(params.scheduler_type, schedule, params.omega_scale, generators)
    guidance = Guidance(params, schedule.num_inference_steps)
    timesteps = schedule.timesteps.to(noise.device)
    total = len(timesteps)
    batch = noise.shape[0]
    latents = noise
    for i in range(total):
        branches = guidance.branches(i)
        model_input = latents.repeat(len(branches), 1, 1, 1) if len(branches) > 1 else latents
        output = step_fn(model_input, timesteps[i].expand(model_input.shape[0]), branches)
        if output.shape != model_input.shape:
            raise ValueError(f"step_fn returned {tuple(output.shape)} for input {tuple(model_input.shape)}")
        outputs = dict(zip(branches, output.split(batch)))
        latents = scheduler.step(guidance.combine(i, outputs), latents)
        if callback is not None:
            callback(i, total)
    return latents
