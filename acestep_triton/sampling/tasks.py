"""Every generation task's latents, as ACE-Step v1 computes them, driven through `step_fn`.

Triton-free: the in-process pipeline and the `diffusion` model (BLS) both call `generate`, with
their own `step_fn` (sampling.loop describes it; here a step's rows may carry different latents
per branch: flow-edit sends its source and target latents in one batch). Upstream's numerics are
kept bit for bit on CPU float32 (`../shared/golden/ext/README.md` lists the quirks); the few
deliberate differences are said where they are made and in docs/architecture.md.

- text2music: noise from the seeds, the scheduler's loop (sampling.loop.denoise).
- retake: the same loop from cos(a) * noise + sin(a) * retake_noise, a = retake_variance * pi / 2.
- repaint / extend: the source latents x0 and a noise z0; the loop starts at
  n_min = int(steps * (1 - retake_variance)) from the blend (1 - t) x0 + t z0 and takes plain Euler
  steps (no omega rescaling), after each of which the frames outside the repainted window
  (repaint) or outside the added frames (extend) are reset to the blend at the next t: they end
  exactly at x0. A repaint window covering the whole source is a retake of the source's length.
- edit (flow-edit): from the clean source, the velocity difference target - source is averaged
  over edit_n_avg noises per step between n_min and n_max, then the target condition alone
  denoises from n_max on.
- audio2audio: a second scheduler whose table starts at sigma_max = 1 - ref_audio_strength, run
  for int((1 - strength) * steps) steps from ref * (1 - s) + noise * s.

Several seeds: item b draws its noise from generators[b] and retake_generators[b] and starts from
the same source; items never mix (APG, omega and the noise are per item).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from acestep_triton.contract import (
    AUDIO2AUDIO,
    EDIT,
    EDIT_SOURCE,
    EDIT_SOURCE_NULL,
    EDIT_TARGET,
    EDIT_TARGET_NULL,
    EXTEND,
    MAX_DURATION_S,
    REPAINT,
    RETAKE,
    TEXT2MUSIC,
    GenerationParams,
    ParameterError,
    SourceAudio,
    source_field,
    uses_guidance,
    validate_source,
)
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.sampling.guidance import Guidance, MomentumBuffer, apg
from acestep_triton.sampling.loop import ProgressFn, StepFn, denoise
from acestep_triton.sampling.schedulers import (
    Schedule,
    flow_match_schedule,
    pingpong_noise,
    training_sigma_range,
)
from acestep_triton.sampling.seeds import initial_noise

# The longest result, in latent frames (upstream's max_infer_fame_length for extend).
MAX_FRAMES = PUBLISHED_GEOMETRY.frames(MAX_DURATION_S)


# ---------------------------------------------------------------- source audio and lengths


@dataclass(frozen=True)
class Window:
    """Where repaint or extend regenerates, in latent frames: `left` / `right` frames added before /
    after the source (extend), [start, end) the regenerated frames of the result."""

    left: int
    right: int
    start: int
    end: int


def repaint_window(params: GenerationParams, frames: int) -> Window:
    """repaint_start/repaint_end (seconds, truncated to frames toward zero as upstream) against a
    source of `frames` latent frames, for a request contract.validate_source accepted.

    Repaint regenerates [start, end) inside the source. Extend adds the frames before 0 on the left
    and the frames past the source's end on the right, each side measured against the source.
    (Upstream measures a right extension against the already left-extended latents, so a request
    extending both sides got its right side shortened by the left one, or failed; fixed here,
    docs/architecture.md.)
    """
    start, end = PUBLISHED_GEOMETRY.frames(params.repaint_start), PUBLISHED_GEOMETRY.frames(params.repaint_end)
    if params.task == REPAINT:
        return Window(0, 0, start, end)
    left, right = max(0, -start), max(0, end - frames)
    return Window(left, right, 0, frames + left + right)


def check_source(params: GenerationParams, source: SourceAudio | None) -> int | None:
    """Validate the task's source audio against the request (contract.validate_source, the checks the
    gateway makes before queueing, plus finite samples): its latent frames, or None for tasks that
    take none. ParameterError names the field (src_audio_path / ref_audio_input, repaint_*)."""
    validate_source(params, source)
    if source is None:
        return None
    if not np.isfinite(source.samples).all():
        raise ParameterError(source_field(params.task), "audio holds NaN or infinite samples")
    return PUBLISHED_GEOMETRY.source_frames(source.samples.shape[1], int(source.sample_rate))


def result_frames(params: GenerationParams, duration: float, frames: int | None) -> int:
    """Latent frames of the result: from `duration` without a source, else the source's `frames`
    (extend: plus the added ones)."""
    if frames is None:
        return PUBLISHED_GEOMETRY.frames(duration)
    if params.task == EXTEND:
        window = repaint_window(params, frames)
        return frames + window.left + window.right
    return frames


def plan_task(params: GenerationParams, source_length: int | None) -> str:
    """The loop a request runs: its task, but retake for a repaint whose window covers the whole
    source (upstream's quirk: the source is then ignored)."""
    if params.task == REPAINT and source_length is not None:
        window = repaint_window(params, source_length)
        if window.end - window.start == source_length:
            return RETAKE
    return params.task


# ---------------------------------------------------------------- the numbers each loop needs


def schedule_steps(params: GenerationParams) -> int:
    """Upstream's `infer_steps` after its oss_steps handling: max(oss_steps) when given."""
    return max(params.oss_steps) if params.oss_steps else params.infer_step


def repaint_start_index(params: GenerationParams) -> int:
    """n_min of repaint/extend: the loop index the run starts at (double precision, truncated)."""
    return int(schedule_steps(params) * (1 - params.retake_variance))


def edit_indices(params: GenerationParams) -> tuple[int, int]:
    """(n_min, n_max) of flow-edit: averaging from n_min, the target alone from n_max."""
    return int(params.infer_step * params.edit_n_min), int(params.infer_step * params.edit_n_max)


def audio2audio_schedule(params: GenerationParams) -> tuple[Schedule, float]:
    """audio2audio's second scheduler: (its schedule, the noise level of the start latents).

    sigma_max = 1 - ref_audio_strength starts the training table, whose shift gives the start's
    noise level (0.5 -> 0.75); the int((1 - strength) * steps) steps then run from that level
    shifted once more (0.75 -> 0.9): upstream's noise level and first timestep do not match.
    """
    sigma_max = 1 - params.ref_audio_strength
    steps = int(sigma_max * schedule_steps(params))
    schedule = flow_match_schedule(params.scheduler_type, steps, sigma_max=sigma_max)
    return schedule, training_sigma_range(sigma_max)[0]


def retake_angle(variance: float) -> torch.Tensor:
    """Upstream's mixing angle: variance * pi / 2 in double precision, as a float32 0-d tensor."""
    return torch.tensor(variance * math.pi / 2, dtype=torch.float32)


def retake_mix(noise: torch.Tensor, retake_noise: torch.Tensor, variance: float) -> torch.Tensor:
    """cos(a) * noise + sin(a) * retake_noise (a = retake_angle): unit variance for any a."""
    angle = retake_angle(variance)
    return torch.cos(angle) * noise + torch.sin(angle) * retake_noise


@dataclass(frozen=True)
class Repaint:
    """What the repaint loop blends: x0 [1 or B, C, H, T] (the source, extended with zero frames),
    z0 [B, C, H, T] (its noise), mask [B, C, H, T] float (1 where the model regenerates)."""

    x0: torch.Tensor
    z0: torch.Tensor
    mask: torch.Tensor


def repaint_inputs(task: str, window: Window, source: torch.Tensor, noise: torch.Tensor,
                   retake_noise: torch.Tensor, variance: float) -> Repaint:
    """x0, z0 and the mask of repaint or extend, from the source latents [1, C, H, Ts] and the two
    draws [B, C, H, Ts] (both of the source's length, as upstream draws them).

    Repaint: z0 is the retake mix inside the window, the plain noise outside. Extend: x0 gets zero
    frames on the extended sides, z0 is the first `left` frames of retake_noise, then the noise,
    then the last `right` frames of retake_noise (no mixing).
    """
    if task == REPAINT:
        mask = torch.zeros_like(noise)
        mask[..., window.start:window.end] = 1.0
        z0 = torch.where(mask == 1.0, retake_mix(noise, retake_noise, variance), noise)
        return Repaint(source, z0, mask)
    x0 = torch.nn.functional.pad(source, (window.left, window.right))
    pieces = [retake_noise[..., :window.left], noise, retake_noise[..., retake_noise.shape[-1] - window.right:]]
    z0 = torch.cat(pieces, dim=-1)
    mask = torch.zeros_like(z0)
    mask[..., :window.left] = 1.0
    mask[..., mask.shape[-1] - window.right:] = 1.0
    return Repaint(x0, z0, mask)


def blend(x0: torch.Tensor, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) * x0 + t * z0: the source noised to level t (t = timestep / 1000, float32)."""
    return (1 - t) * x0 + t * z0


def repaint_entry(x0: torch.Tensor, z0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The latents the repaint loop enters with at n_min: upstream's (clone(x0) + blend) - x0,
    left unsimplified (it differs from the blend by float32 rounding)."""
    return (x0.clone() + blend(x0, z0, t)) - x0


def repaint_step(latents: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                 r: Repaint) -> torch.Tensor:
    """A plain Euler step to t_next inside the mask, the blend at t_next outside it."""
    moved = latents.float() + (t_next - t) * velocity
    return torch.where(r.mask == 1.0, moved, blend(r.x0, r.z0, t_next))


def audio2audio_start(reference: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """ref * (1 - s) + noise * s, s the shifted sigma_max (a Python float, as upstream)."""
    return reference * (1 - sigma) + noise * sigma


def edit_noised(x_src: torch.Tensor, zt_edit: torch.Tensor, noise: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-edit's pair at level t: (zt_src, zt_tar) = ((1 - t) x_src + t noise, zt_edit + zt_src - x_src)."""
    zt_src = (1 - t) * x_src + t * noise
    return zt_src, zt_edit + zt_src - x_src


# ---------------------------------------------------------------- the calls each loop makes


def _timestep_pairs(timesteps: torch.Tensor, first: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(i, t_i, t_{i+1}) for loop indices first.., t = timestep / 1000 in float32, 0 after the last."""
    pairs = []
    for i in range(first, len(timesteps)):
        t = timesteps[i] / 1000
        t_next = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t)
        pairs.append((i, t, t_next))
    return pairs


def _edit_branches(params: GenerationParams) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(source rows, target rows) of an edit evaluation: each with its unconditional row under CFG."""
    if uses_guidance(params):
        return (EDIT_SOURCE, EDIT_SOURCE_NULL), (EDIT_TARGET, EDIT_TARGET_NULL)
    return (EDIT_SOURCE,), (EDIT_TARGET,)


def call_plan(params: GenerationParams, source_length: int | None = None) -> list[tuple[str, ...]]:
    """The branches of every `step_fn` call `generate` makes, in order (the condition cache
    releases a branch at its last call). `source_length` as check_source returns it."""
    task = plan_task(params, source_length)
    if task == EDIT:
        n_min, n_max = edit_indices(params)
        source, target = _edit_branches(params)
        calls = []
        for i in range(n_min, params.infer_step):
            calls += [source + target] * params.edit_n_avg if i < n_max else [target]
        return calls
    if task == AUDIO2AUDIO:
        schedule = audio2audio_schedule(params)[0]
    else:
        schedule = flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
    first = repaint_start_index(params) if task in (REPAINT, EXTEND) else 0
    guidance = Guidance(params, schedule.num_inference_steps)
    return [guidance.branches(i) for i in range(first, len(schedule.timesteps))]


# ---------------------------------------------------------------- the loops


def generate(
    step_fn: StepFn,
    params: GenerationParams,
    generators: Sequence[torch.Generator],
    retake_generators: Sequence[torch.Generator],
    duration: float,
    source: torch.Tensor | None = None,
    callback: ProgressFn | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The final latents [B, C, H, T] of `params.task` (B = len(generators)).

    `duration`: seconds to generate without a source (text2music, retake). `source`: the encoded
    source / reference latents [1, C, H, Ts] of the audio-input tasks (check_source has validated
    the request against it). `callback(i, total)` after each loop step, as sampling.loop.denoise.
    """
    frames = source.shape[-1] if source is not None else PUBLISHED_GEOMETRY.frames(duration)
    task = plan_task(params, frames if source is not None else None)

    def draw(gens: Sequence[torch.Generator]) -> torch.Tensor:
        return initial_noise(gens, frames, PUBLISHED_GEOMETRY, device)

    if task == EDIT:
        return _flow_edit(step_fn, params, source, retake_generators, draw, callback)
    noise = draw(generators)
    if task == TEXT2MUSIC:
        return denoise(step_fn, params, noise, generators, callback)
    if task == AUDIO2AUDIO:
        schedule, sigma = audio2audio_schedule(params)
        return denoise(step_fn, params, audio2audio_start(source, noise, sigma), generators, callback, schedule)
    retake_noise = draw(retake_generators)
    if task == RETAKE:
        return denoise(step_fn, params, retake_mix(noise, retake_noise, params.retake_variance), generators, callback)
    window = repaint_window(params, frames)
    return _repaint(step_fn, params, repaint_inputs(task, window, source, noise, retake_noise, params.retake_variance),
                    callback)


def _repaint(step_fn: StepFn, params: GenerationParams, r: Repaint, callback: ProgressFn | None) -> torch.Tensor:
    """Repaint and extend from n_min on: guidance as text2music, plain Euler steps merged with the blend.

    With n_min past the last step nothing runs and the result is the source (upstream returns
    its untouched initial noise there, retake_variance 0 with euler: fixed, docs/architecture.md).
    """
    schedule = flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
    guidance = Guidance(params, schedule.num_inference_steps)
    timesteps = schedule.timesteps.to(r.z0.device)
    items = r.z0.shape[0]
    pairs = _timestep_pairs(schedule.timesteps, repaint_start_index(params))
    if not pairs:
        return r.x0.expand_as(r.z0).clone()
    latents = repaint_entry(r.x0, r.z0, pairs[0][1])
    for done, (i, t, t_next) in enumerate(pairs):
        branches = guidance.branches(i)
        model_input = latents.repeat(len(branches), 1, 1, 1) if len(branches) > 1 else latents
        output = step_fn(model_input, timesteps[i].expand(model_input.shape[0]), branches)
        velocity = guidance.combine(i, dict(zip(branches, output.split(items))))
        latents = repaint_step(latents, velocity, t, t_next, r)
        if callback is not None:
            callback(done, len(pairs))
    return latents


def _flow_edit(step_fn: StepFn, params: GenerationParams, x_src: torch.Tensor,
               generators: Sequence[torch.Generator], draw, callback: ProgressFn | None) -> torch.Tensor:
    """Upstream's flowedit_diffusion_process over the Euler schedule of infer_step steps.

    All noise comes from the retake generators. APG always (cfg_type is ignored), with one momentum
    buffer for every source evaluation of the run, none for the target while averaging, and a
    fresh one for the target from n_max on. pingpong propagates nothing while averaging (upstream
    computes the step and drops it, drawing its noise) and re-noises from n_max on.
    """
    schedule = flow_match_schedule("euler", params.infer_step)
    timesteps = schedule.timesteps.to(x_src.device)
    items = len(generators)
    x_src = x_src.expand(items, *x_src.shape[1:])
    n_min, n_max = edit_indices(params)
    source_rows, target_rows = _edit_branches(params)
    pingpong = params.scheduler_type == "pingpong"
    momentum_source, momentum_target = MomentumBuffer(), MomentumBuffer()

    def guided(outputs: dict[str, torch.Tensor], rows: tuple[str, ...], momentum: MomentumBuffer) -> torch.Tensor:
        if len(rows) == 1:
            return outputs[rows[0]]
        return apg(outputs[rows[0]], outputs[rows[1]], params.guidance_scale, momentum)

    zt_edit, xt_tar = x_src.clone(), None
    pairs = _timestep_pairs(schedule.timesteps, n_min)
    for done, (i, t, t_next) in enumerate(pairs):
        if i < n_max:
            velocity = torch.zeros_like(x_src)
            for _ in range(params.edit_n_avg):
                zt_src, zt_tar = edit_noised(x_src, zt_edit, draw(generators), t)
                rows = source_rows + target_rows
                latents = torch.cat([zt_src] * len(source_rows) + [zt_tar] * len(target_rows))
                outputs = dict(zip(rows, step_fn(latents, timesteps[i].expand(latents.shape[0]), rows).split(items)))
                v_src = guided(outputs, source_rows, momentum_source)
                v_tar = guided(outputs, target_rows, MomentumBuffer())
                velocity += (1 / params.edit_n_avg) * (v_tar - v_src)
            zt_edit = zt_edit.float()
            if pingpong:
                pingpong_noise(generators, zt_edit)
            else:
                zt_edit = zt_edit + (t_next - t) * velocity
        else:
            if i == n_max:
                sigma = schedule.sigmas[n_max]
                xt_src = sigma * draw(generators) + (1.0 - sigma) * x_src
                xt_tar = zt_edit + xt_src - x_src
            latents = xt_tar.repeat(len(target_rows), 1, 1, 1) if len(target_rows) > 1 else xt_tar
            output = step_fn(latents, timesteps[i].expand(latents.shape[0]), target_rows)
            v_tar = guided(dict(zip(target_rows, output.split(items))), target_rows, momentum_target)
            xt_tar = xt_tar.float()
            if pingpong:
                xt_tar = (1 - t_next) * (xt_tar - t * v_tar) + t_next * pingpong_noise(generators, xt_tar)
            else:
                xt_tar = xt_tar + (t_next - t) * v_tar
        if callback is not None:
            callback(done, len(pairs))
    return zt_edit if xt_tar is None else xt_tar


def loop_steps(params: GenerationParams, source_length: int | None = None) -> int:
    """How many steps (callback calls) `generate` makes for `params`."""
    task = plan_task(params, source_length)
    if task == EDIT:
        return max(0, params.infer_step - edit_indices(params)[0])
    if task == AUDIO2AUDIO:
        return len(audio2audio_schedule(params)[0].timesteps)
    total = len(flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps).timesteps)
    return max(0, total - repaint_start_index(params)) if task in (REPAINT, EXTEND) else total
