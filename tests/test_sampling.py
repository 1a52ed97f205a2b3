"""Schedules, seeds, guidance and the denoising loop against the official implementation's golden runs.

How the loop is checked (teacher forcing): golden stores the raw transformer outputs
(`stepNN_decodeK_*`) only for step 0 and the first guided step, but the guided velocity
(`stepNN_model_output`) and the latents after every step. `denoise` runs with a `step_fn`
that asserts its inputs (latents, timestep, branch labels) equal golden's and answers with
- the stored raw outputs, where golden has them;
- on unguided steps, `stepNN_model_output` as the "cond" output (no guidance happens, so the
  scheduler must get exactly that);
- on CFG-guided steps, `stepNN_model_output` for both cond and null: CFG then returns it
  unchanged (uncond + s * 0).
APG keeps a momentum buffer built from the raw outputs of earlier guided steps, which golden
does not store past the first one, so APG runs are followed up to the first such step only;
the scheduler steps after it are checked one by one from golden's `stepNN_model_output`
(test_scheduler_steps_match_golden), and APG's momentum by a unit test.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acestep_triton.contract import COND, NO_LYRIC, NULL, GenerationParams, ParameterError
from acestep_triton.sampling.guidance import (
    APG_NORM_THRESHOLD,
    Guidance,
    MomentumBuffer,
    apg,
    guidance_interval,
)
from acestep_triton.sampling.loop import denoise, required_branches
from acestep_triton.sampling.schedulers import flow_match_schedule, make_scheduler, omega_weight
from acestep_triton.sampling.seeds import (
    initial_noise,
    latent_frames,
    make_generators,
    resolve_duration,
    resolve_seeds,
)
from tests.golden_cases import GOLDEN_CASES

STAGE_TOL = 1e-5  # atol = STAGE_TOL * max(1, max|ref|)
DECODE_KEY = re.compile(r"step(\d\d)_decode(\d)_(cond|null|no_lyric)(_erg)?$")


def assert_within(actual: torch.Tensor, ref: torch.Tensor, rel_tol: float = STAGE_TOL) -> None:
    assert actual.shape == ref.shape
    torch.testing.assert_close(actual, ref, rtol=0.0, atol=rel_tol * max(1.0, ref.abs().max().item()))


@cache
def load_case(golden_dir: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((golden_dir / f"{name}.json").read_text()), load_file(golden_dir / f"{name}.safetensors")


def golden_params(meta: dict) -> GenerationParams:
    kw = meta["call_kwargs"]
    fields = (
        "prompt lyrics audio_duration infer_step guidance_scale scheduler_type cfg_type omega_scale "
        "guidance_interval guidance_interval_decay min_guidance_scale use_erg_tag use_erg_lyric "
        "use_erg_diffusion guidance_scale_text guidance_scale_lyric"
    ).split()
    oss = kw["oss_steps"]
    return GenerationParams(
        **{f: kw[f] for f in fields},
        actual_seeds=tuple(meta["pipeline_returned_params"]["actual_seeds"]),
        oss_steps=tuple(int(s) for s in oss.split(",")) if oss else (),
    )


def params(**overrides) -> GenerationParams:
    return GenerationParams(prompt="pop", lyrics="la", **overrides)


def golden_decodes(golden: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """step -> {label: raw decode output} for the steps golden stored them."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in golden.items():
        if m := DECODE_KEY.match(key):
            out.setdefault(int(m[1]), {})[m[3]] = value
    return out


def decode_plan(meta: dict) -> list[tuple[str, ...]]:
    steps: dict[int, list[str]] = {}
    for call in sorted(meta["decode_calls"], key=lambda c: (c["step"], c["index_in_step"])):
        steps.setdefault(call["step"], []).append(call["encoder_hidden_states"])
    return [tuple(steps[i]) for i in range(len(steps))]


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


# --- schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_schedule_matches_golden(golden_dir, name):
    meta, golden = load_case(golden_dir, name)
    p = golden_params(meta)
    schedule = flow_match_schedule(p.scheduler_type, p.infer_step, p.oss_steps)
    assert torch.equal(schedule.timesteps, golden["scheduler_timesteps"])
    assert torch.equal(schedule.sigmas, golden["scheduler_sigmas"])
    assert schedule.num_inference_steps == p.infer_step
    assert schedule.timesteps.tolist() == [s["timestep"] for s in meta["steps"]]


def upstream_oss_timesteps(oss_steps: list[int]) -> np.ndarray:
    """Upstream's oss_steps formula, written out in numpy from its scheduler code:
    shifted float32 training table -> sigma_min; float64 linspace over max(oss) steps, shifted,
    cast to float32; pick the 1-based oss indices; /1000 and shift again in float32."""
    table = np.linspace(1.0, 1000.0, 1000, dtype=np.float32)[::-1] / np.float32(1000)
    table = np.float32(3.0) * table / (np.float32(1) + np.float32(2.0) * table)
    sigmas = np.linspace(float(table[0]) * 1000, float(table[-1]) * 1000, max(oss_steps)) / 1000
    timesteps = (3.0 * sigmas / (1 + 2.0 * sigmas)).astype(np.float32) * np.float32(1000)
    picked = timesteps[np.asarray(oss_steps) - 1] / np.float32(1000)
    return (np.float32(3.0) * picked / (np.float32(1) + np.float32(2.0) * picked)) * np.float32(1000)


@pytest.mark.parametrize("scheduler_type", ["euler", "pingpong"])
def test_oss_steps_schedule(scheduler_type):
    oss = [1, 3, 8, 14, 20]
    schedule = flow_match_schedule(scheduler_type, 60, oss)
    assert torch.equal(schedule.timesteps, torch.from_numpy(upstream_oss_timesteps(oss)))
    assert torch.equal(schedule.sigmas[:-1] * 1000, schedule.timesteps)
    assert schedule.sigmas[-1] == 0 and schedule.num_inference_steps == len(oss)
    plain = flow_match_schedule(scheduler_type, max(oss)).timesteps[[s - 1 for s in oss]]
    assert (schedule.timesteps[1:] > plain[1:]).all()  # picked timesteps are shifted again (upstream quirk)


def test_heun_schedule_repeats_timesteps():
    euler, heun = flow_match_schedule("euler", 5), flow_match_schedule("heun", 5)
    repeated = [t for t in euler.timesteps[1:].tolist() for _ in range(2)]
    assert heun.timesteps.tolist() == [euler.timesteps[0].item()] + repeated
    assert len(heun.sigmas) == len(heun.timesteps) + 1 and heun.num_inference_steps == 5


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_omega_weight_matches_golden(golden_dir, name):
    meta, _ = load_case(golden_dir, name)
    assert {omega_weight(s["omega"]) for s in meta["steps"]} == {s["omega_after_logistic"] for s in meta["steps"]}


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_scheduler_steps_match_golden(golden_dir, name):
    """Every step fed golden's guided velocity and input latents reproduces golden's output latents."""
    meta, golden = load_case(golden_dir, name)
    p = golden_params(meta)
    schedule = flow_match_schedule(p.scheduler_type, p.infer_step)
    scheduler = make_scheduler(p.scheduler_type, schedule, p.omega_scale, make_generators(p.actual_seeds))
    latents = golden["init_noise"]
    for i in range(len(schedule.timesteps)):
        out = scheduler.step(golden[f"step{i:02d}_model_output"], latents)
        assert_within(out, golden[f"step{i:02d}_latents_out"])
        latents = golden[f"step{i:02d}_latents_out"]
    assert torch.equal(latents, golden["final_latents"])


# --- seeds and noise -------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_initial_noise_is_bit_exact(golden_dir, name):
    meta, golden = load_case(golden_dir, name)
    seeds = resolve_seeds(golden_params(meta).actual_seeds)
    frames = latent_frames(meta["call_kwargs"]["audio_duration"])
    assert frames == meta["frame_length"]
    assert torch.equal(initial_noise(make_generators(seeds), frames), golden["init_noise"])


def test_initial_noise_draws_per_item():
    noise = initial_noise(make_generators([5, 6]), 7)
    assert noise.shape == (2, 8, 16, 7)
    assert torch.equal(noise[1:], initial_noise(make_generators([6]), 7))


def test_resolve_seeds():
    assert resolve_seeds([3, 4]) == (3, 4)
    assert resolve_seeds([3, 4], batch_size=4) == (3, 4, 4, 4)  # upstream repeats the last seed
    drawn = resolve_seeds([], batch_size=3)
    assert len(drawn) == 3 and all(0 <= s < 2**32 for s in drawn)
    assert resolve_seeds([]) != resolve_seeds([])  # fresh randomness (collision chance 2**-32)


def test_latent_frames_and_random_duration():
    assert latent_frames(5.0) == 53 and latent_frames(240.0) == 2583
    assert resolve_duration(12.5, seed=1) == 12.5
    drawn = {resolve_duration(-1, seed=s) for s in range(20)}
    assert all(30.0 <= d <= 240.0 for d in drawn) and len(drawn) == 20
    assert resolve_duration(-1, seed=7) == resolve_duration(-1, seed=7)


# --- guidance ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_guidance_plan_matches_golden_decode_calls(golden_dir, name):
    meta, _ = load_case(golden_dir, name)
    p = golden_params(meta)
    schedule = flow_match_schedule(p.scheduler_type, p.infer_step)
    guidance = Guidance(p, schedule.num_inference_steps)
    plan = decode_plan(meta)
    assert [guidance.branches(i) for i in range(len(schedule.timesteps))] == plan
    assert required_branches(p) == tuple(sorted({b for step in plan for b in step}, key=(COND, NULL, NO_LYRIC).index))
    # the ERG-diffusion convention step_fn implements: only "null" rows, only with use_erg_diffusion
    for call in meta["decode_calls"]:
        erg_active = call["diffusion_erg_hooks_active"] > 0
        assert erg_active == (call["encoder_hidden_states"] == NULL and p.use_erg_diffusion)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_guidance_matches_golden_raw_decodes(golden_dir, name):
    meta, golden = load_case(golden_dir, name)
    p = golden_params(meta)
    guidance = Guidance(p, flow_match_schedule(p.scheduler_type, p.infer_step).num_inference_steps)
    decodes = golden_decodes(golden)
    assert any(guidance.is_guided(i) for i in decodes)
    for i in sorted(decodes):  # first-seen order: the APG momentum starts empty, as in golden
        assert_within(guidance.combine(i, decodes[i]), golden[f"step{i:02d}_model_output"])


def test_guidance_interval_and_decay():
    assert guidance_interval(8, 0.5) == (2, 6) and guidance_interval(6, 1.0) == (0, 6)
    g = Guidance(params(infer_step=8, guidance_interval_decay=1.0, min_guidance_scale=3.0), 8)
    assert [g.scale(i) for i in range(2, 6)] == [15.0, 11.0, 7.0, 3.0]
    half = Guidance(params(infer_step=8, guidance_interval_decay=0.5, min_guidance_scale=3.0), 8)
    assert half.scale(5) == 9.0
    single = Guidance(params(infer_step=2, guidance_interval_decay=1.0), 2)  # upstream divides by zero here
    assert [single.is_guided(i) for i in range(2)] == [True, False] and single.scale(0) == 15.0
    for off in (0.0, 1.0):
        assert Guidance(params(guidance_scale=off, guidance_interval=1.0), 60).branches(5) == (COND,)


def test_apg_momentum_and_norm_clamp():
    torch.manual_seed(0)
    cond = torch.zeros(1, 2, 4, 6)
    cond[..., 0, :] = 1.0  # cond spans only row 0; the diff below lies in row 1: orthogonal
    d1 = torch.zeros_like(cond)
    d1[..., 1, :] = torch.randn(1, 2, 6)
    d1 = d1 / d1.norm(dim=(-1, -2), keepdim=True) * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    momentum = MomentumBuffer()
    out1 = apg(cond, cond - d1, 15.0, momentum)
    norms = d1.norm(dim=(-1, -2), keepdim=True)  # channel 0 below the clamp, channel 1 above
    assert_within(out1, cond + 14.0 * d1 * torch.clamp(APG_NORM_THRESHOLD / norms, max=1.0))
    out2 = apg(cond, cond - d1, 15.0, momentum)  # same diff again: running average = d1 - 0.75 d1
    avg = 0.25 * d1
    avg_clamp = torch.clamp(APG_NORM_THRESHOLD / avg.norm(dim=(-1, -2), keepdim=True), max=1.0)
    assert_within(out2, cond + 14.0 * avg * avg_clamp)
    parallel = apg(cond, cond - 0.1 * cond, 15.0, MomentumBuffer())
    assert_within(parallel, cond)  # a diff along cond is projected away (eta = 0)


def test_apg_momentum_only_on_guided_steps():
    g = Guidance(params(infer_step=8), 8)  # guided 2..5
    outputs = {COND: torch.ones(1, 8, 16, 4), NULL: torch.zeros(1, 8, 16, 4)}
    g.combine(0, {COND: outputs[COND]})
    assert g.momentum.average is None
    g.combine(2, outputs)
    assert torch.equal(g.momentum.average, outputs[COND])


def test_cfg_star_zero_init():
    g = Guidance(params(cfg_type="cfg_star", guidance_interval=1.0, infer_step=4), 4)
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 8, 16, 5), torch.randn(2, 8, 16, 5)
    for i in (0, 1):
        assert torch.equal(g.combine(i, {COND: cond, NULL: uncond}), torch.zeros_like(cond))
    alpha = (cond * uncond).sum(dim=(1, 2, 3), keepdim=True) / ((uncond**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    assert_within(g.combine(2, {COND: cond, NULL: uncond}), alpha * uncond + 15.0 * (cond - alpha * uncond))
    late = Guidance(params(cfg_type="cfg_star", infer_step=8), 8)  # guided from 2: never zero-initialised
    assert not torch.equal(late.combine(2, {COND: cond, NULL: uncond}), torch.zeros_like(cond))


@pytest.mark.parametrize("cfg_type", ["apg", "cfg", "cfg_star"])
def test_double_condition_overrides_cfg_type(cfg_type):
    p = params(
        cfg_type=cfg_type, guidance_scale_text=2.0, guidance_scale_lyric=3.0, guidance_interval=1.0, infer_step=4
    )
    g = Guidance(p, 4)
    assert g.branches(0) == (COND, NO_LYRIC, NULL)
    assert required_branches(p) == (COND, NULL, NO_LYRIC)
    torch.manual_seed(0)
    cond, no_lyric, uncond = torch.randn(3, 1, 8, 16, 5)
    out = g.combine(0, {COND: cond, NO_LYRIC: no_lyric, NULL: uncond})  # step 0: no cfg_star zero init either
    assert_within(out, (1 - 2.0) * uncond + (2.0 - 3.0) * no_lyric + 3.0 * cond)
    assert g.momentum.average is None
    one_sided = Guidance(replace(p, guidance_scale_lyric=1.0), 4)
    assert one_sided.branches(0) == (COND, NULL)


# --- the loop ------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the teacher step_fn where golden has no data to go on."""


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_denoise_teacher_forced(golden_dir, name):
    meta, golden = load_case(golden_dir, name)
    p = golden_params(meta)
    plan, decodes = decode_plan(meta), golden_decodes(golden)
    timesteps = [s["timestep"] for s in meta["steps"]]
    checked: list[int] = []

    def step_fn(latents, timestep, branches):
        i = len(checked)
        expected_in = golden["init_noise"] if i == 0 else golden[f"step{i - 1:02d}_latents_out"]
        assert tuple(branches) == plan[i]
        assert latents.shape[0] == len(branches) * expected_in.shape[0]
        for rows in latents.split(expected_in.shape[0]):
            assert_within(rows, expected_in)
        assert timestep.tolist() == [timesteps[i]] * latents.shape[0]
        checked.append(i)
        model_output = golden[f"step{i:02d}_model_output"]
        if i in decodes:
            raw = decodes[i]
        elif branches == (COND,):
            raw = {COND: model_output}
        elif p.cfg_type == "cfg":
            raw = {COND: model_output, NULL: model_output}
        else:
            raise _Stop
        return torch.cat([raw[b] for b in branches])

    noise = initial_noise(make_generators(p.actual_seeds), latent_frames(p.audio_duration))
    progress: list[tuple[int, int]] = []
    try:
        final = denoise(step_fn, p, noise, make_generators(p.actual_seeds), callback=lambda *a: progress.append(a))
    except _Stop:
        assert p.cfg_type == "apg"
        assert checked == [0, 1, 2, 3]  # inputs of steps 0-3 = golden latents after steps 0-2
    else:
        assert checked == list(range(len(plan)))
        assert_within(final, golden["final_latents"])
    assert progress == [(i, len(plan)) for i in range(len(progress))] and progress


def test_pingpong_noise_order():
    """Pingpong re-noises at every step, the last included, each item from its own generator,
    continuing after the initial noise (upstream's order for one item)."""
    seeds, frames = (11, 22), 3
    p = params(scheduler_type="pingpong", infer_step=4, guidance_scale=1.0, actual_seeds=seeds)
    generators = make_generators(seeds)
    noise = initial_noise(generators, frames)
    final = denoise(lambda x, t, b: torch.zeros_like(x), p, noise, generators)

    replay = make_generators(seeds)
    initial_noise(replay, frames)
    sigmas = flow_match_schedule("pingpong", 4).sigmas
    expected = noise
    for i in range(4):
        draw = torch.cat([torch.empty((1, *noise.shape[1:])).normal_(generator=g) for g in replay])
        expected = (1 - sigmas[i + 1]) * (expected - sigmas[i] * 0.0) + sigmas[i + 1] * draw
    assert torch.equal(final, expected)
    for g, r in zip(generators, replay):
        assert torch.equal(g.get_state(), r.get_state())


def test_items_do_not_depend_on_each_other():
    """A seed gives the same latents alone or batched with other seeds (euler mean-rescale, pingpong noise)."""
    for scheduler in ("euler", "pingpong"):
        p = params(scheduler_type=scheduler, infer_step=3, guidance_scale=1.0, actual_seeds=(3, 4))
        step = lambda x, t, b: torch.sin(x) * 0.5  # noqa: E731
        both = denoise(step, p, initial_noise(make_generators((3, 4)), 3), make_generators((3, 4)))
        solo_p = params(scheduler_type=scheduler, infer_step=3, guidance_scale=1.0, actual_seeds=(4,))
        solo = denoise(step, solo_p, initial_noise(make_generators((4,)), 3), make_generators((4,)))
        assert torch.allclose(both[1:], solo, atol=1e-6), scheduler


def test_denoise_rejects_wrong_step_fn_output():
    p = params(infer_step=2, actual_seeds=(1,))
    noise = initial_noise(make_generators([1]), 4)
    with pytest.raises(ValueError, match="step_fn returned"):
        denoise(lambda x, t, b: x[:1, :, :, :2], p, noise, make_generators([1]))


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"scheduler_type": "ddim"}, "scheduler_type"),
        ({"cfg_type": "pag"}, "cfg_type"),
        ({"infer_step": 0}, "infer_step"),
        ({"infer_step": 1001}, "infer_step"),
        ({"oss_steps": (0, 5)}, "oss_steps"),
        ({"oss_steps": (1001,)}, "oss_steps"),
        ({"oss_steps": (1, 2), "scheduler_type": "heun"}, "oss_steps"),
        ({"audio_duration": 0.05}, "audio_duration"),  # shorter than one latent frame
    ],
)
def test_params_reject_bad_inputs(overrides, field):
    """The loop's inputs are checked once, by contract.validate, before any sampling code runs."""
    with pytest.raises(ParameterError) as err:
        params(**overrides)
    assert err.value.field == field
