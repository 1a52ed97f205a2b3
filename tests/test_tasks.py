"""The tasks' math (acestep_triton.sampling.tasks) against the official implementation's bookkeeping.

Teacher-forced: each formula is fed the golden inputs it read upstream (noise draws, source latents,
the model's velocities) and checked against the golden output at the bookkeeping tolerance of
golden/ext/README.md (1e-6 * max(1, |ref|); guidance from raw model outputs at the stage
tolerance, 1e-5). Where no golden exists (right and two-sided extension, other strengths, other
n_min/n_max/n_avg, several seeds), the formulas are checked from first principles with a stand-in
model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from acestep_triton.contract import (
    AUDIO2AUDIO,
    EDIT,
    EDIT_BRANCHES,
    EXTEND,
    REPAINT,
    RETAKE,
    TEXT2MUSIC,
    GenerationParams,
    ParameterError,
    SourceAudio,
)
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.sampling.guidance import Guidance, MomentumBuffer, apg
from acestep_triton.sampling.schedulers import EulerScheduler, flow_match_schedule
from acestep_triton.sampling.seeds import initial_noise, make_generators
from acestep_triton.sampling.tasks import (
    MAX_FRAMES,
    Window,
    audio2audio_schedule,
    audio2audio_start,
    blend,
    call_plan,
    check_source,
    edit_indices,
    edit_noised,
    generate,
    loop_steps,
    plan_task,
    repaint_entry,
    repaint_inputs,
    repaint_start_index,
    repaint_step,
    repaint_window,
    result_frames,
    retake_angle,
    retake_mix,
)
from tests.golden_cases import ext_request, ext_tensors

BOOKKEEPING_TOL = 1e-6
STAGE_TOL = 1e-5
FPS = 44100 / 512 / 8


def assert_within(actual: torch.Tensor, ref: torch.Tensor, rel_tol: float = BOOKKEEPING_TOL) -> None:
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    torch.testing.assert_close(actual.float(), ref.float(), rtol=0.0, atol=rel_tol * max(1.0, ref.abs().max().item()))


@pytest.fixture(scope="module", params=["r1_retake_v02", "p1_repaint", "x1_extend_left", "ed1_edit_navg1",
                                        "a1_audio2audio_s05"])
def case(request, golden_dir: Path):
    params, source = ext_request(golden_dir, request.param)
    return request.param, params, source, ext_tensors(golden_dir, request.param)


def _case(golden_dir: Path, name: str):
    params, source = ext_request(golden_dir, name)
    return params, source, ext_tensors(golden_dir, name)


def test_noise_draws_replay_both_generator_lists(case) -> None:
    name, params, source, g = case
    source_length = check_source(params, source)
    frames = source_length or PUBLISHED_GEOMETRY.frames(params.audio_duration)
    assert result_frames(params, params.audio_duration, source_length) == g["final_latents"].shape[-1]
    if "init_noise" in g:
        assert torch.equal(initial_noise(make_generators(params.actual_seeds), frames), g["init_noise"])
    if "retake_noise" in g:
        assert torch.equal(initial_noise(make_generators(params.retake_seeds), frames), g["retake_noise"])
    if name.startswith("ed1"):  # edit draws everything from the retake generators, in order
        generators = make_generators(params.retake_seeds)
        for k in range(6):
            assert torch.equal(initial_noise(generators, frames), g[f"randn_call{k}"])


def test_source_frames_round_up_the_padded_audio(golden_dir: Path) -> None:
    params, source, g = _case(golden_dir, "p1_repaint")
    assert PUBLISHED_GEOMETRY.source_frames(source.samples.shape[1], source.sample_rate) == g["src_latents"].shape[-1] == 65
    assert PUBLISHED_GEOMETRY.source_frames(44100 * 6, 44100) == 65 and PUBLISHED_GEOMETRY.source_frames(4096, 44100) == 1 and PUBLISHED_GEOMETRY.source_frames(4097, 44100) == 2


def test_retake_mixes_the_initial_noise(golden_dir: Path) -> None:
    params, _, g = _case(golden_dir, "r1_retake_v02")
    assert torch.equal(retake_angle(params.retake_variance), g["pre_retake_variance"])
    assert_within(retake_mix(g["init_noise"], g["retake_noise"], params.retake_variance), g["retake_mixed_init"])
    assert call_plan(params) == [Guidance(params, 8).branches(i) for i in range(8)]


def _repaint_chain(params: GenerationParams, g: dict, task: str, window: Window) -> None:
    """Setup, entry and every executed step from the golden velocities."""
    r = repaint_inputs(task, window, g["src_latents"], g["init_noise"], g["retake_noise"], params.retake_variance)
    assert torch.equal(r.mask, g["repaint_mask"])
    assert_within(r.x0, g["x0"])
    assert_within(r.z0, g["z0"])
    n_min = repaint_start_index(params)
    timesteps = flow_match_schedule(params.scheduler_type, params.infer_step).timesteps
    t = timesteps[n_min] / 1000
    assert_within(blend(r.x0, r.z0, t), g["entry_zt_src"])
    entry = repaint_entry(r.x0, r.z0, t)
    assert_within(entry, g["entry_latents"])
    assert_within(g[f"step{n_min:02d}_latents"], g["entry_latents"])
    for i in range(n_min, params.infer_step):
        t, t_next = timesteps[i] / 1000, (timesteps[i + 1] / 1000 if i + 1 < params.infer_step else torch.tensor(0.0))
        assert torch.equal(t, g[f"step{i:02d}_t_i" if f"step{i:02d}_t_i" in g else f"step{i:02d}_t_i_v0"])
        out = repaint_step(g[f"step{i:02d}_latents"], g[f"step{i:02d}_model_output"], t, t_next, r)
        assert_within(out, g[f"step{i:02d}_latents_out"])
    first = f"step{n_min:02d}"
    assert_within(g[f"{first}_latents"].float() + (timesteps[n_min + 1] / 1000 - timesteps[n_min] / 1000)
                  * g[f"{first}_model_output"], g[f"{first}_prev_sample"])
    # outside the mask the result is exactly the source
    final = g["final_latents"]
    assert torch.equal(final[r.mask == 0], r.x0.expand_as(final)[r.mask == 0])


def test_repaint_bookkeeping(golden_dir: Path) -> None:
    params, source, g = _case(golden_dir, "p1_repaint")
    frames = check_source(params, source)
    window = repaint_window(params, frames)
    assert window == Window(0, 0, int(1 * FPS), int(3 * FPS)) == Window(0, 0, 10, 32)
    assert repaint_start_index(params) == 2  # int(8 * (1 - 0.7)) in double precision
    r = repaint_inputs(REPAINT, window, g["src_latents"], g["init_noise"], g["retake_noise"], params.retake_variance)
    assert_within(retake_mix(g["init_noise"], g["retake_noise"], params.retake_variance), g["repaint_noise_mix"])
    assert torch.equal(r.z0[r.mask == 0], g["init_noise"][r.mask == 0])
    _repaint_chain(params, g, REPAINT, window)
    assert call_plan(params, frames) == [Guidance(params, 8).branches(i) for i in range(2, 8)]
    assert loop_steps(params, frames) == 6


def test_extend_left_bookkeeping(golden_dir: Path) -> None:
    params, source, g = _case(golden_dir, "x1_extend_left")
    frames = check_source(params, source)
    window = repaint_window(params, frames)
    assert window == Window(21, 0, 0, 86)  # int(-2 * fps) = -21: truncated toward zero
    assert repaint_start_index(params) == 0
    r = repaint_inputs(EXTEND, window, g["src_latents"], g["init_noise"], g["retake_noise"], params.retake_variance)
    assert torch.equal(r.z0, torch.cat([g["retake_noise"][..., :21], g["init_noise"]], dim=-1))
    assert torch.equal(blend(r.x0, r.z0, torch.tensor(1.0)), r.z0)  # t = 1 at step 0: the entry is the noise
    _repaint_chain(params, g, EXTEND, window)


def test_repaint_guidance_from_raw_outputs(golden_dir: Path) -> None:
    """APG on the first guided step from the model's raw outputs (the interval over all 8 indices)."""
    params, _, g = _case(golden_dir, "p1_repaint")
    guidance = Guidance(params, 8)
    assert (guidance.start, guidance.end) == (2, 6)
    velocity = guidance.combine(2, {"cond": g["step02_decode0_cond"], "null": g["step02_decode1_null_erg"]})
    assert_within(velocity, g["step02_model_output"], STAGE_TOL)


def test_audio2audio_schedule_and_start(golden_dir: Path) -> None:
    params, source, g = _case(golden_dir, "a1_audio2audio_s05")
    schedule, sigma = audio2audio_schedule(params)
    assert sigma == pytest.approx(0.75, abs=1e-6)  # 0.5 shifted once
    assert schedule.num_inference_steps == 7  # int(0.5 * 15)
    assert torch.equal(schedule.timesteps, g["a2a_timesteps"])
    assert torch.equal(schedule.sigmas, g["a2a_sigmas"])
    assert schedule.timesteps[0].item() == pytest.approx(900.0, abs=1e-3)  # shifted twice: not 750
    assert_within(audio2audio_start(g["ref_latents"], g["init_noise"], sigma), g["a2a_noisy_latents"])
    guidance = Guidance(params, schedule.num_inference_steps)
    assert (guidance.start, guidance.end) == (1, 5)
    scheduler = EulerScheduler(schedule, params.omega_scale)
    latents = g["a2a_noisy_latents"]
    for i in range(7):
        assert_within(g[f"step{i:02d}_latents"], latents)
        latents = scheduler.step(g[f"step{i:02d}_model_output"], g[f"step{i:02d}_latents"])
        assert_within(latents, g[f"step{i:02d}_latents_out"])
    assert call_plan(params, check_source(params, source)) == [guidance.branches(i) for i in range(7)]


def test_flow_edit_bookkeeping(golden_dir: Path) -> None:
    params, source, g = _case(golden_dir, "ed1_edit_navg1")
    assert edit_indices(params) == (1, 6)
    schedule = flow_match_schedule("euler", params.infer_step)
    x_src, zt_edit = g["src_latents"], g["src_latents"].clone()
    momentum_source = MomentumBuffer()
    for i in range(1, 6):
        t, t_next = schedule.timesteps[i] / 1000, schedule.timesteps[i + 1] / 1000
        zt_src, zt_tar = edit_noised(x_src, zt_edit, g[f"step{i:02d}_avg0_fwd_noise"], t)
        if f"step{i:02d}_avg0_zt_src" in g:
            assert_within(zt_src, g[f"step{i:02d}_avg0_zt_src"])
            assert_within(zt_tar, g[f"step{i:02d}_avg0_zt_tar"])
        if f"step{i:02d}_avg0_decode0_edit_src" in g:  # raw outputs [cond; uncond] of the first two steps
            src, tar = g[f"step{i:02d}_avg0_decode0_edit_src"], g[f"step{i:02d}_avg0_decode1_edit_tar"]
            assert_within(apg(src[:1], src[1:], params.guidance_scale, momentum_source),
                          g[f"step{i:02d}_avg0_Vt_src"], STAGE_TOL)
            assert_within(apg(tar[:1], tar[1:], params.guidance_scale, MomentumBuffer()),
                          g[f"step{i:02d}_avg0_Vt_tar"], STAGE_TOL)
        velocity = torch.zeros_like(x_src)
        velocity += 1.0 * (g[f"step{i:02d}_avg0_Vt_tar"] - g[f"step{i:02d}_avg0_Vt_src"])
        assert_within(velocity, g[f"step{i:02d}_model_output"])
        zt_edit = zt_edit + (t_next - t) * velocity
        assert_within(zt_edit, g[f"step{i:02d}_latents_out"])
        zt_edit = g[f"step{i:02d}_latents_out"]
    sigma = schedule.sigmas[6]
    assert torch.equal(sigma, g["step06_sigma"])
    xt_src = sigma * g["step06_fwd_noise"] + (1.0 - sigma) * x_src
    assert_within(xt_src, g["step06_xt_src"])
    xt_tar = zt_edit + xt_src - x_src
    assert_within(xt_tar, g["step06_xt_tar_v0"])
    dec = g["step06_decode0_edit_tar"]
    assert_within(apg(dec[:1], dec[1:], params.guidance_scale, MomentumBuffer()), g["step06_Vt_tar"], STAGE_TOL)
    for i in (6, 7):
        t, t_next = schedule.timesteps[i] / 1000, (schedule.timesteps[i + 1] / 1000 if i < 7 else torch.tensor(0.0))
        xt_tar = xt_tar + (t_next - t) * g[f"step{i:02d}_Vt_tar"]
        assert_within(xt_tar, g[f"step{i:02d}_latents_out"])
        xt_tar = g[f"step{i:02d}_latents_out"]
    both = EDIT_BRANCHES
    assert call_plan(params) == [both] * 5 + [both[2:]] * 2
    assert loop_steps(params) == 7


# ---------------------------------------------------------------- first principles


def _source(seconds: float, rate: int = 44100, channels: int = 2) -> SourceAudio:
    return SourceAudio(np.zeros((channels, int(round(seconds * rate))), dtype=np.float32), rate)


def _params(**overrides) -> GenerationParams:
    return GenerationParams(**{"prompt": "pop", "lyrics": "", "infer_step": 8, "actual_seeds": (3,), **overrides})


def test_extend_right_and_both_sides_measure_against_the_source() -> None:
    frames = 10
    source = torch.randn(1, 8, 16, frames, generator=torch.Generator().manual_seed(0))
    noise, retake = (torch.randn(1, 8, 16, frames, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    right = _params(task=EXTEND, repaint_end=(frames + 3.5) / FPS)
    assert repaint_window(right, frames) == Window(0, 3, 0, 13)
    r = repaint_inputs(EXTEND, repaint_window(right, frames), source, noise, retake, right.retake_variance)
    assert torch.equal(r.x0, torch.cat([source, torch.zeros(1, 8, 16, 3)], dim=-1))
    assert torch.equal(r.z0, torch.cat([noise, retake[..., -3:]], dim=-1))  # the last frames of the retake draw
    assert r.mask[..., :10].eq(0).all() and r.mask[..., 10:].eq(1).all()
    both = _params(task=EXTEND, repaint_start=-2.5 / FPS, repaint_end=(frames + 3.5) / FPS)
    window = repaint_window(both, frames)
    assert window == Window(2, 3, 0, 15)  # upstream would have added 3 - 2 = 1 frame on the right
    r = repaint_inputs(EXTEND, window, source, noise, retake, both.retake_variance)
    assert torch.equal(r.z0, torch.cat([retake[..., :2], noise, retake[..., -3:]], dim=-1))
    assert torch.equal(r.x0[..., 2:12], source) and r.x0[..., :2].eq(0).all() and r.x0[..., 12:].eq(0).all()
    assert r.mask[..., 2:12].eq(0).all() and r.mask[..., :2].eq(1).all() and r.mask[..., 12:].eq(1).all()
    assert result_frames(both, 0.0, frames) == 15


@pytest.mark.parametrize(("overrides", "source_s", "field"), [
    ({"task": REPAINT, "repaint_start": 1.0, "repaint_end": 7.0}, 6.0, "repaint_end"),  # past the source
    ({"task": REPAINT, "repaint_start": 1.0, "repaint_end": 1.02}, 6.0, "repaint_end"),  # no whole frame
    ({"task": EXTEND, "repaint_start": 1.0, "repaint_end": 5.0}, 6.0, "repaint_start"),  # extends nothing
    ({"task": EXTEND, "repaint_start": -7.0, "repaint_end": 5.0}, 6.0, "repaint_start"),  # side > source
    ({"task": EXTEND, "repaint_start": -50.0, "repaint_end": 5.0}, 200.0, "repaint_start"),  # result > 240 s
    ({"task": REPAINT, "repaint_start": 0.0, "repaint_end": 1.0}, 240.5, "src_audio_path"),  # source > 240 s
    ({"task": AUDIO2AUDIO}, 240.5, "ref_audio_input"),
])
def test_requests_the_source_cannot_serve_name_the_field(overrides, source_s, field) -> None:
    with pytest.raises(ParameterError) as raised:
        check_source(_params(**overrides), _source(source_s, rate=8000))
    assert raised.value.field == field


def test_source_presence_and_shape_are_checked() -> None:
    with pytest.raises(ParameterError, match="src_audio_path: task 'repaint' needs an audio input"):
        check_source(_params(task=REPAINT, repaint_end=1.0), None)
    with pytest.raises(ParameterError, match="src_audio_path: task 'text2music' takes no audio input"):
        check_source(_params(), _source(1.0))
    with pytest.raises(ParameterError, match="ref_audio_input: audio must be"):
        check_source(_params(task=AUDIO2AUDIO), _source(1.0, channels=3))
    nan = _source(1.0)
    nan.samples[0, 5] = np.nan
    with pytest.raises(ParameterError, match="NaN"):
        check_source(_params(task=EDIT), nan)
    assert check_source(_params(task=EDIT), _source(1.0, rate=22050, channels=1)) == PUBLISHED_GEOMETRY.source_frames(22050, 22050)
    assert check_source(_params(task=REPAINT, repaint_end=240.0), _source(240.0)) > MAX_FRAMES  # as the padding gives


def test_audio2audio_at_another_strength_from_its_definition() -> None:
    """Strength 0.8: sigma_max 0.2 (double) starts the training table, shifted once for the start
    level; int(0.19999999999999996 * 15) = 2 steps spaced from that level, shifted again."""
    params = _params(task=AUDIO2AUDIO, ref_audio_strength=0.8, infer_step=15)
    schedule, sigma = audio2audio_schedule(params)
    first = np.float32(np.float32((1 - 0.8) * 1000) / np.float32(1000))
    assert sigma == pytest.approx(3 * first / (1 + 2 * first), abs=1e-7)
    assert len(schedule.timesteps) == schedule.num_inference_steps == int((1 - 0.8) * 15) == 2
    low = np.float32(np.float32(1 / 1000))
    low = 3 * low / (1 + 2 * low)
    spaced = np.linspace(sigma * 1000, float(low) * 1000, 2) / 1000
    expected = torch.from_numpy(3 * spaced / (1 + 2 * spaced)).float()
    assert torch.equal(schedule.sigmas[:-1], expected) and schedule.sigmas[-1] == 0
    noise, ref = torch.randn(1, 8, 16, 4), torch.randn(1, 8, 16, 4)
    assert torch.equal(audio2audio_start(ref, noise, sigma), ref * (1 - sigma) + noise * sigma)
    assert loop_steps(params) == 2


def _stand_in(calls: list | None = None):
    """A deterministic per-row model: the velocity depends on the row's latents, timestep and branch."""
    def step_fn(latents, timestep, branches):
        if calls is not None:
            calls.append((tuple(branches), latents.clone()))
        items = latents.shape[0] // len(branches)
        weights = torch.tensor([1.0 + 0.25 * (hash(b) % 7) for b in branches]).repeat_interleave(items)
        return 0.3 * latents * weights.reshape(-1, 1, 1, 1) + 0.001 * timestep.reshape(-1, 1, 1, 1)
    return step_fn


TASK_CASES = {
    TEXT2MUSIC: {},
    RETAKE: {"task": RETAKE, "retake_variance": 0.3},
    REPAINT: {"task": REPAINT, "repaint_start": 0.2, "repaint_end": 0.6, "retake_variance": 0.6},
    EXTEND: {"task": EXTEND, "repaint_start": -0.3, "repaint_end": 1.2, "retake_variance": 0.9},
    EDIT: {"task": EDIT, "edit_n_min": 0.25, "edit_n_max": 0.75, "edit_n_avg": 2, "scheduler_type": "pingpong"},
    AUDIO2AUDIO: {"task": AUDIO2AUDIO, "ref_audio_strength": 0.3, "scheduler_type": "heun"},
}


def _run(params: GenerationParams, seeds, retake_seeds, calls=None, progress=None):
    source = torch.randn(1, 8, 16, 9, generator=torch.Generator().manual_seed(7)) if params.task in (
        REPAINT, EXTEND, EDIT, AUDIO2AUDIO) else None
    return generate(_stand_in(calls), params, make_generators(seeds), make_generators(retake_seeds), 0.5, source,
                    progress)


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_each_item_equals_its_solo_run_and_the_plan_is_kept(task: str) -> None:
    params = _params(audio_duration=0.5, **TASK_CASES[task])
    calls, progress = [], []
    both = _run(params, (3, 4), (30, 40), calls, lambda i, total: progress.append((i, total)))
    source_length = 9 if params.task in (REPAINT, EXTEND, EDIT, AUDIO2AUDIO) else None  # _run's source
    assert [branches for branches, _ in calls] == call_plan(params, source_length)
    assert progress == [(i, loop_steps(params)) for i in range(loop_steps(params))]
    for item, (seed, retake_seed) in enumerate([(3, 30), (4, 40)]):
        solo = _run(params, (seed,), (retake_seed,))
        torch.testing.assert_close(both[item:item + 1], solo, rtol=0, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_edit_draws_each_noise_in_order_from_the_retake_generators() -> None:
    """With a zero-velocity model the averaging leaves the source unchanged, so the result is the
    n_max draw noised onto the source: it must be draw number (n_max - n_min) * n_avg."""
    params = _params(task=EDIT, edit_n_min=0.25, edit_n_max=0.75, edit_n_avg=2)
    n_min, n_max = edit_indices(params)
    assert (n_min, n_max) == (2, 6)
    source = torch.randn(1, 8, 16, 5)
    calls = []

    def zero(latents, timestep, branches):
        calls.append((tuple(branches), latents.clone()))
        return torch.zeros_like(latents)

    out = generate(zero, params, make_generators((1,)), make_generators((9,)), 0.0, source)
    replay = make_generators((9,))
    draws = [initial_noise(replay, 5) for _ in range((n_max - n_min) * 2 + 1)]
    t = flow_match_schedule("euler", 8).timesteps[n_min] / 1000
    zt_src = (1 - t) * source + t * draws[0]
    assert calls[0][0] == EDIT_BRANCHES
    zt_tar = source + zt_src - source  # upstream: zt_edit + zt_src - x_src, zt_edit still the source
    assert torch.equal(calls[0][1], torch.cat([zt_src, zt_src, zt_tar, zt_tar]))
    sigma = flow_match_schedule("euler", 8).sigmas[n_max]
    assert torch.equal(out, source + (sigma * draws[-1] + (1.0 - sigma) * source) - source)


def test_edit_without_guidance_evaluates_the_conditional_rows_only() -> None:
    params = _params(task=EDIT, guidance_scale=1.0, edit_n_max=0.5)
    assert call_plan(params) == [EDIT_BRANCHES[::2]] * 4 + [EDIT_BRANCHES[2:3]] * 4


def test_repaint_of_the_whole_source_is_a_retake_and_zero_variance_keeps_the_source() -> None:
    frames = 9
    whole = _params(task=REPAINT, repaint_start=0.0, repaint_end=frames / FPS + 1e-3)
    assert plan_task(whole, frames) == RETAKE
    assert len(call_plan(whole, frames)) == 8 and loop_steps(whole, frames) == 8
    keep = _params(task=REPAINT, repaint_start=0.2, repaint_end=0.6, retake_variance=0.0)
    assert repaint_start_index(keep) == 8 and call_plan(keep, frames) == []
    source = torch.randn(1, 8, 16, frames)
    out = generate(_stand_in(), keep, make_generators((1, 2)), make_generators((3, 4)), 0.0, source)
    assert torch.equal(out, source.expand(2, -1, -1, -1))


def test_retake_angle_is_the_double_angle_rounded_once() -> None:
    assert retake_angle(0.7).item() == np.float32(0.7 * math.pi / 2)
