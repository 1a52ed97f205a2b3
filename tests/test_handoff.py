"""Conditions cross into dit_step once per request; bounded dit_step batches; on the tiny checkpoint.

First the loop side (acestep_triton.bls_loop) against dit_step's own request handling
(acestep_triton.dit_step.DitStep) and the real DiT, without a server. Then dit_step served by a
real tritonserver: a direct client, keys, misses, releases, requests of different conditions in one
batch, and the rows x frames bound. The whole ensemble through this path is
tests/test_triton_repository.py (it must equal the in-process pipeline).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from acestep_triton.bls_loop import StepLoop
from acestep_triton.sampling.tasks import call_plan
from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.condition_cache import MISS_MESSAGE, ConditionCache, ConditionSender, decode_keys
from acestep_triton.contract import GenerationParams
from acestep_triton.dit_step import DitStep
from acestep_triton.engines import load_engines
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.sampling.conditions import Conditions
from acestep_triton.sampling.loop import denoise
from acestep_triton.sampling.seeds import initial_noise, make_generators
from acestep_triton.specs import CONDITION_KEY, CONDITION_RELEASE, KEYED_INPUTS
from export.build_repository import build_repository

PARAMS = GenerationParams(prompt="p", lyrics="", audio_duration=2.0, infer_step=6, actual_seeds=(3,))
FRAMES = 8
TOKENS = 6


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    return load_engines(["dit_step"], validate_checkpoint(tiny_checkpoint))["dit_step"]


def conditions(dim: int, seed: int, branches=("cond", "null")) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(len(branches), TOKENS)
    mask[1, -2:] = 0
    return Conditions(tuple(branches), torch.randn(len(branches), TOKENS, dim, generator=g), mask)


class Recorded:
    """dit_step's request handling without Triton (acestep_triton.dit_step.DitStep, as the in-process
    pipeline calls it); records what each request carried."""

    def __init__(self, engine, cache: ConditionCache) -> None:
        self.step, self.cache = DitStep(engine, cache), cache
        self.requests: list[dict] = []

    def __call__(self, batch):
        keys = decode_keys(batch[CONDITION_KEY]) if CONDITION_KEY in batch else None
        release = batch[CONDITION_RELEASE].reshape(-1).tolist() if CONDITION_RELEASE in batch else None
        self.requests.append({"inline": "ENCODER_STATES" in batch, "keys": keys, "release": release})
        return self.step(batch)["VELOCITY"]


def run_loop(engine, dit_call, cond: Conditions, with_cache: bool, callback=None):
    sender = ConditionSender("request-1") if with_cache else None
    loop = StepLoop(dit_call, cond, PARAMS.use_erg_diffusion, sender, call_plan(PARAMS))
    generators = make_generators(PARAMS.actual_seeds)
    noise = initial_noise(generators, FRAMES)
    try:
        return denoise(loop.step, PARAMS, noise, generators, callback), loop
    except Exception:
        loop.release()
        raise


def test_conditions_cross_once_per_branch_and_the_result_equals_sending_them_every_step(dit) -> None:
    cond = conditions(dit.spec.input("ENCODER_STATES").dims[-1], seed=0)
    every_step, _ = run_loop(dit, Recorded(dit, ConditionCache(2**20, 60)), cond, with_cache=False)
    cache = ConditionCache(2**20, 60)
    served = Recorded(dit, cache)
    latents, _ = run_loop(dit, served, cond, with_cache=True)
    assert torch.equal(latents, every_step)
    assert len(served.requests) == PARAMS.infer_step  # no call beyond the steps: releases ride on them
    branch_sets = {tuple(dict.fromkeys(r["keys"])) for r in served.requests}
    assert sum(r["inline"] for r in served.requests) == len(branch_sets) > 1
    released = [k for r in served.requests if r["release"] for k, flag in zip(r["keys"], r["release"]) if flag]
    assert sorted(set(released)) == sorted({k for r in served.requests for k in r["keys"]})
    assert len(cache) == 0


def test_a_miss_is_answered_by_sending_the_conditions_again(dit) -> None:
    cond = conditions(dit.spec.input("ENCODER_STATES").dims[-1], seed=1)
    reference, _ = run_loop(dit, Recorded(dit, ConditionCache(2**20, 60)), cond, with_cache=False)
    cache = ConditionCache(2**20, 60)
    served = Recorded(dit, cache)

    def evict(step, total):  # another instance / a restarted stub: the entries are gone
        if step == 3:
            cache.clear()

    latents, _ = run_loop(dit, served, cond, with_cache=True, callback=evict)
    assert torch.equal(latents, reference)
    after = served.requests[4:]
    assert not after[0]["inline"] and after[1]["inline"] and after[1]["keys"] == after[0]["keys"]
    assert len(cache) == 0


@pytest.mark.parametrize("failure", [RuntimeError("cancelled"), ValueError("scheduler failed")])
def test_a_stopped_loop_releases_its_conditions(dit, failure) -> None:
    cond = conditions(dit.spec.input("ENCODER_STATES").dims[-1], seed=2)
    cache = ConditionCache(2**20, 60)
    served = Recorded(dit, cache)

    def stop(step, total):
        if step == 2:
            assert len(cache) > 0
            raise failure

    with pytest.raises(type(failure)):
        run_loop(dit, served, cond, with_cache=True, callback=stop)
    assert served.requests[-1]["release"] and not served.requests[-1]["inline"]
    assert len(cache) == 0


# ----------------------------------------------------------------------------- served dit_step

BOUND_ROWS = 2


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory, triton_server_factory, tiny_checkpoint, lyric_vocab):
    """A tritonserver serving only dit_step (cpu profile): at most 2 rows x FRAMES per forward, and
    a queue delay long enough that concurrent requests share executions."""
    repo = build_repository("cpu", tiny_checkpoint, tmp_path_factory.mktemp("dit_repo"), lyric_vocab,
                            overrides={"dit_max_row_frames": BOUND_ROWS * FRAMES, "dit_queue_delay_us": 200_000})
    for model in [p for p in Path(repo).iterdir() if p.is_dir() and p.name != "dit_step"]:
        shutil.rmtree(model)
    return triton_server_factory(repo)


def step_batch(cond: Conditions, rows: list[int], frames: int = FRAMES, seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    n = len(rows)
    return {
        "LATENTS": torch.randn(n, PUBLISHED_GEOMETRY.channels, PUBLISHED_GEOMETRY.height, frames, generator=g).numpy(),
        "ATTENTION_MASK": np.ones((n, frames), np.float32),
        "ENCODER_STATES": cond.states[rows].numpy(),
        "ENCODER_MASK": cond.mask[rows].numpy(),
        "TIMESTEP": np.full((n, 1), 500.0, np.float32),
        "Q_SCALE": np.ones((n, 1), np.float32),
    }


def call(server, batch: dict[str, np.ndarray], keys: list[str] | None = None, release: bool = False,
         inline: bool = True) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_url)
    arrays = {k: v for k, v in batch.items() if inline or k not in KEYED_INPUTS}
    if keys is not None:
        arrays[CONDITION_KEY] = np.array([k.encode() for k in keys], dtype=np.object_).reshape(-1, 1)
    if release:
        arrays[CONDITION_RELEASE] = np.ones((len(batch["LATENTS"]), 1), dtype=bool)
    inputs = []
    for name, array in arrays.items():
        dtype = {np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL"}.get(array.dtype, "BYTES")
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer("dit_step", inputs, timeout=120).as_numpy("VELOCITY")


def expected(dit, batch: dict[str, np.ndarray]) -> np.ndarray:
    return dit.run({k: torch.from_numpy(v) for k, v in batch.items()})["VELOCITY"].numpy()


def dim(dit) -> int:
    return dit.spec.input("ENCODER_STATES").dims[-1]


def test_direct_client_sending_conditions_every_call_still_works(dit_server, dit) -> None:
    batch = step_batch(conditions(dim(dit), 10), [0, 1])
    np.testing.assert_allclose(call(dit_server, batch), expected(dit, batch), atol=1e-5, rtol=0)


def test_keys_hit_after_one_inline_send_and_miss_after_release(dit_server, dit) -> None:
    cond = conditions(dim(dit), 11)
    batch = step_batch(cond, [0, 1])
    keys = ["served-a|cond", "served-a|null"]
    with pytest.raises(InferenceServerException, match=MISS_MESSAGE):
        call(dit_server, batch, keys, inline=False)
    call(dit_server, batch, keys)
    np.testing.assert_allclose(call(dit_server, batch, keys, inline=False), expected(dit, batch), atol=1e-5, rtol=0)
    swapped = step_batch(cond, [1, 0])
    np.testing.assert_allclose(call(dit_server, swapped, keys[::-1], inline=False, release=True),
                               expected(dit, swapped), atol=1e-5, rtol=0)
    with pytest.raises(InferenceServerException, match=MISS_MESSAGE):
        call(dit_server, batch, keys, inline=False)


def test_requests_with_different_conditions_share_executions_and_each_gets_its_own(dit_server, dit) -> None:
    conds = {name: conditions(dim(dit), seed) for name, seed in (("x", 12), ("y", 13))}
    batches = {name: step_batch(cond, [0, 1], seed=i) for i, (name, cond) in enumerate(conds.items())}
    keys = {name: [f"share-{name}|cond", f"share-{name}|null"] for name in conds}
    for name in conds:
        call(dit_server, batches[name], keys[name])
    client = httpclient.InferenceServerClient(dit_server.http_url)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics("dit_step")["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])

    before = counts()
    results: dict[tuple[str, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(name: str, i: int) -> None:
        try:  # every other request of x sends its conditions inline (a direct client beside the loops)
            inline = name == "x" and i % 2 == 0
            results[name, i] = call(dit_server, batches[name], None if inline else keys[name], inline=inline)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name, i)) for i in range(4) for name in conds]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for (name, _), velocity in results.items():
        np.testing.assert_allclose(velocity, expected(dit, batches[name]), atol=1e-5, rtol=0)
    requests, executions = (a - b for a, b in zip(counts(), before))
    assert requests == 8 and executions < requests


def test_more_rows_than_the_bound_run_in_sub_batches(dit_server, dit) -> None:
    batch = step_batch(conditions(dim(dit), 14, branches=("cond", "null", "no_lyric")), [0, 1, 2, 0, 1])
    assert len(batch["LATENTS"]) > BOUND_ROWS
    np.testing.assert_allclose(call(dit_server, batch), expected(dit, batch), atol=1e-5, rtol=0)


def test_a_row_over_the_bound_fails_its_request_clearly_and_frees_its_conditions(dit_server, dit) -> None:
    cond = conditions(dim(dit), 15)
    keys = ["long-a|cond", "long-a|null"]
    long = step_batch(cond, [0, 1], frames=BOUND_ROWS * FRAMES + 1)
    with pytest.raises(InferenceServerException, match="rows x frames"):
        call(dit_server, long, keys)
    with pytest.raises(InferenceServerException, match=MISS_MESSAGE):
        call(dit_server, step_batch(cond, [0, 1]), keys, inline=False)
    batch = step_batch(cond, [0])
    np.testing.assert_allclose(call(dit_server, batch), expected(dit, batch), atol=1e-5, rtol=0)
