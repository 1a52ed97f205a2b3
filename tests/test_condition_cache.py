"""The condition cache and bounded sub-batches on their own (no Triton): fast tests.

The served behaviour (misses re-sent, releases, mixed batches through a real tritonserver) is in
tests/test_handoff.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from acestep_triton.batching import collate, split
from acestep_triton.condition_cache import (
    MISS_MESSAGE,
    ConditionCache,
    ConditionKey,
    ConditionMiss,
    ConditionRow,
    ConditionSender,
    condition_rows,
    decode_keys,
    is_miss,
    new_request_id,
    resolve_conditions,
    stack_rows,
)
from acestep_triton.contract import ParameterError, TensorSpec
from acestep_triton.specs import ComponentSpec
from acestep_triton.sub_batches import BatchBoundError, Part, plan_sub_batches, run_bounded

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(seed: int, tokens: int = 5, dim: int = 4) -> ConditionRow:
    g = torch.Generator().manual_seed(seed)
    return ConditionRow(torch.randn(tokens, dim, generator=g), torch.ones(tokens))


def as_rows(states: torch.Tensor, mask: torch.Tensor, rows: Sequence[int]) -> list[ConditionRow]:
    """A stand-in `prepare` that records how many rows it prepared, and which rows of the request."""
    as_rows.prepared += states.shape[0]
    as_rows.rows = list(rows)
    return condition_rows(states * 2, mask)


def test_put_copies_and_get_returns_rows_in_key_order() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    first = row(0)
    stored = cache.put("a", first)
    first.tokens.zero_()  # the request's memory is reused after execute(): the cache must not alias it
    cache.put("b", row(1))
    got = cache.get(["b", "a", "b"])
    assert torch.equal(got[1].tokens, row(0).tokens) and torch.equal(got[0].tokens, row(1).tokens)
    assert got[2] is got[0] and got[1] is stored and stored.serial != first.serial


def test_serials_are_unique_and_views_of_a_batch_are_stored_compactly() -> None:
    batch = torch.randn(3, 5, 4)
    rows = condition_rows(batch, torch.ones(3, 5))
    assert len({r.serial for r in rows}) == 3 and rows[1].tokens.data_ptr() == batch[1].data_ptr()
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    stored = cache.put("k", rows[1])
    assert cache.nbytes == stored.nbytes == (5 * 4 + 5) * 4 and stored.tokens.untyped_storage().nbytes() == 5 * 4 * 4


def test_stack_rows_pads_tokens_with_zeros_and_the_mask_with_its_fill() -> None:
    tokens, mask = stack_rows([row(0, tokens=3), row(1, tokens=5)], float("-inf"))
    assert tokens.shape == (2, 5, 4) and torch.equal(tokens[0, :3], row(0, tokens=3).tokens)
    assert tokens[0, 3:].abs().sum() == 0 and mask[0].tolist() == [1, 1, 1, float("-inf"), float("-inf")]


def test_one_row_is_stacked_without_a_copy() -> None:
    only = row(0, tokens=3)
    tokens, mask = stack_rows([only], float("-inf"))
    assert tokens.shape == (1, 3, 4) and mask.shape == (1, 3)
    assert tokens.data_ptr() == only.tokens.data_ptr() and mask.data_ptr() == only.mask.data_ptr()


def test_miss_names_every_missing_key_and_is_recognisable() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    cache.put("a", row(0))
    with pytest.raises(ConditionMiss) as info:
        cache.get(["a", "x", "y", "x"])
    assert info.value.keys == ("x", "y")
    assert is_miss(str(info.value)) and str(info.value).startswith(MISS_MESSAGE)
    assert not is_miss("dit_step: internal error")


def test_release_frees_bytes_and_tolerates_absent_keys() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    cache.put("a", row(0))
    cache.put("b", row(1))
    assert cache.release(["a", "zzz"]) == 1
    assert "a" not in cache and "b" in cache and cache.nbytes == row(1).nbytes
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_ttl_drops_entries_unused_for_that_long() -> None:
    clock = Clock()
    cache = ConditionCache(max_bytes=2**20, ttl_s=10, clock=clock)
    cache.put("old", row(0))
    cache.put("used", row(1))
    clock.now = 8
    cache.get(["used"])
    clock.now = 15
    assert torch.equal(cache.get(["used"])[0].tokens, row(1).tokens)
    assert "old" not in cache


def test_lru_bound_evicts_least_recently_used_first() -> None:
    one = row(0).nbytes
    cache = ConditionCache(max_bytes=2 * one, ttl_s=60)
    cache.put("a", row(0))
    cache.put("b", row(1))
    cache.get(["a"])
    cache.put("c", row(2))
    assert "a" in cache and "c" in cache and "b" not in cache and cache.nbytes <= 2 * one


def test_keys_are_unique_per_request_and_branch() -> None:
    first, second = new_request_id(), new_request_id()
    assert first != second
    keys = {str(ConditionKey(r, b)) for r in (first, second) for b in ("cond", "null")}
    assert len(keys) == 4
    assert str(ConditionKey(first, "cond", adapter="lora-a")) != str(ConditionKey(first, "cond"))


def test_resolve_inline_with_keys_prepares_and_stores_the_first_row_of_each_key_once() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    r0, r1 = row(0), row(1)
    inputs = {"ENCODER_STATES": torch.stack([r0.tokens, r0.tokens, r1.tokens]),
              "ENCODER_MASK": torch.stack([r0.mask, r0.mask, r1.mask])}
    as_rows.prepared = 0
    out = resolve_conditions(cache, inputs, ["k0", "k0", "k1"], as_rows)
    assert as_rows.prepared == 2 and as_rows.rows == [0, 2] and len(cache) == 2
    assert out[0] is out[1] and torch.equal(out[2].tokens, 2 * r1.tokens)
    assert cache.get(["k1", "k0"]) == [out[2], out[0]]  # later steps decode the very same rows


def test_resolve_inline_prepares_only_keys_not_held_yet() -> None:
    """The loop sends (cond, null) inline when null is new and cond is held: cond is not prepared
    again, and its rows are the held ones (the decode's buffer then copies nothing for them)."""
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    held = cache.put("cond", row(0))
    r1 = row(1)
    inputs = {"ENCODER_STATES": torch.stack([row(0).tokens, r1.tokens]),
              "ENCODER_MASK": torch.stack([held.mask, r1.mask])}
    as_rows.prepared = 0
    out = resolve_conditions(cache, inputs, ["cond", "null"], as_rows)
    assert as_rows.prepared == 1 and as_rows.rows == [1] and out[0] is held and torch.equal(out[1].tokens, 2 * r1.tokens)


def test_resolve_by_key_returns_the_stored_rows_without_preparing() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    short, long = cache.put("short", row(0, tokens=3)), cache.put("long", row(1, tokens=5))
    as_rows.prepared = 0
    assert resolve_conditions(cache, {}, ["long", "short", "short"], as_rows) == [long, short, short]
    assert as_rows.prepared == 0


def test_resolve_without_states_or_keys_is_a_clear_error() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    with pytest.raises(ParameterError, match="CONDITION_KEY"):
        resolve_conditions(cache, {}, None, as_rows)
    with pytest.raises(ParameterError, match="come together"):
        resolve_conditions(cache, {"ENCODER_STATES": row(0).tokens[None]}, None, as_rows)
    with pytest.raises(ParameterError, match="2 keys for 1 rows"):
        resolve_conditions(cache, {"ENCODER_STATES": row(0).tokens[None], "ENCODER_MASK": row(0).mask[None]},
                           ["a", "b"], as_rows)
    with pytest.raises(ConditionMiss):
        resolve_conditions(cache, {}, ["never-sent"], as_rows)


def test_direct_client_states_are_prepared_and_not_stored() -> None:
    cache = ConditionCache(max_bytes=2**20, ttl_s=60)
    r = row(0)
    out = resolve_conditions(cache, {"ENCODER_STATES": r.tokens[None], "ENCODER_MASK": r.mask[None]}, None, as_rows)
    assert torch.equal(out[0].tokens, 2 * r.tokens) and len(cache) == 0


def test_sender_sends_inline_until_held_and_again_after_a_miss() -> None:
    sender = ConditionSender("req")
    assert not sender.holds(("cond",))
    sender.sent(("cond",))
    assert sender.holds(("cond",)) and not sender.holds(("cond", "null"))
    keys = decode_keys(sender.row_keys(("cond", "null"), items=2))
    assert keys == [sender.key("cond")] * 2 + [sender.key("null")] * 2
    sender.missed()
    assert not sender.holds(("cond",)) and sender.held() == ()


# ----------------------------------------------------------------------------- bounded sub-batches

SPEC = ComponentSpec(
    name="double",
    inputs=(TensorSpec("X", "TYPE_FP32", (-1,)), TensorSpec("MASK", "TYPE_FP32", (-1,))),
    outputs=(TensorSpec("Y", "TYPE_FP32", (-1,)),),
    max_batch_size=64,
    ragged_inputs=("X", "MASK"),
    ragged_outputs=(("Y", "X"),),
)


def request(rows: int, frames: int, start: float) -> dict[str, torch.Tensor]:
    x = torch.arange(rows * frames, dtype=torch.float32).reshape(rows, frames) + start
    return {"X": x, "MASK": torch.ones(rows, frames)}


class Recorder:
    """A component function (Y = 2 X) that records the shape of every forward."""

    def __init__(self, fail_when_rows: int | None = None) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.fail_when_rows = fail_when_rows

    def __call__(self, batch):
        self.shapes.append(tuple(batch["X"].shape))
        if batch["X"].shape[0] == self.fail_when_rows:
            raise RuntimeError("boom")
        return {"Y": batch["X"] * 2}


def test_plan_keeps_rows_times_longest_within_the_bound() -> None:
    batches, too_long = plan_sub_batches([(3, 10), (2, 20), (1, 50)], bound=60)
    assert too_long == []
    for batch in batches:
        rows = sum(p.stop - p.start for p in batch)
        assert rows * max({0: 10, 1: 20, 2: 50}[p.request] for p in batch) <= 60
    covered = [(p.request, r) for b in batches for p in b for r in range(p.start, p.stop)]
    assert covered == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    assert plan_sub_batches([(2, 5)], None) == ([[Part(0, 0, 2)]], [])


def test_bounded_run_equals_one_batch_and_splits_a_request_over_sub_batches() -> None:
    requests = [request(3, 4, 0), request(2, 7, 100), request(1, 2, 200)]
    whole = split(SPEC, requests, Recorder()(collate(SPEC, requests)))
    recorder = Recorder()
    results = run_bounded(recorder, SPEC, requests, bound=8)
    assert all(rows * frames <= 8 for rows, frames in recorder.shapes) and len(recorder.shapes) > 2
    for got, expected in zip(results, whole):
        assert torch.equal(got["Y"], expected["Y"])


def test_a_row_longer_than_the_bound_fails_only_its_request() -> None:
    results = run_bounded(Recorder(), SPEC, [request(1, 4, 0), request(1, 9, 0)], bound=8)
    assert torch.equal(results[0]["Y"], request(1, 4, 0)["X"] * 2)
    assert isinstance(results[1], BatchBoundError) and "8 rows x frames" in str(results[1])


def test_a_failing_sub_batch_fails_only_its_requests() -> None:
    # bound 4: the first request (2 rows x 2 frames) is one forward of 2 rows, which fails; the
    # second (1 row x 4 frames) cannot join it and runs alone
    recorder = Recorder(fail_when_rows=2)
    results = run_bounded(recorder, SPEC, [request(2, 2, 0), request(1, 4, 0)], bound=4)
    assert isinstance(results[0], RuntimeError)
    assert torch.equal(results[1]["Y"], request(1, 4, 0)["X"] * 2)


def test_out_of_memory_in_one_sub_batch_fails_its_requests_and_the_rest_run() -> None:
    calls = []

    def run(batch):
        calls.append(tuple(batch["X"].shape))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"Y": batch["X"] * 2}

    requests = [request(2, 4, 0), request(2, 4, 10)]
    results = run_bounded(run, SPEC, requests, bound=8)
    assert isinstance(results[0], torch.cuda.OutOfMemoryError)
    assert torch.equal(results[1]["Y"], requests[1]["X"] * 2) and len(calls) == 2
