"""Bounded executions: the rows of one execute() run in sub-batches of at most `bound` rows x length.

Under dynamic batching one execute() may gather many requests; run as one forward, their memory
grows with rows x frames (padded to the longest), and an out-of-memory error would fail all of
them, or leave the instance's allocator fragmented. Here the rows are cut, in arrival order, into
sub-batches whose (rows x longest length) stays within the bound; a request may be split across
sub-batches (rows are independent in every component forward). A failure in one sub-batch fails
only the requests with rows in it; after an out-of-memory error the allocator's cache is emptied.
A request whose single row is longer than the bound fails on its own, naming the bound.

`length` is the variable axis of the spec's first ragged input (latent frames for dit_step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from acestep_triton.batching import collate, split
from acestep_triton.contract import ParameterError
from acestep_triton.specs import ComponentSpec

Run = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
Collate = Callable[[ComponentSpec, Sequence[Mapping[str, torch.Tensor]]], dict[str, torch.Tensor]]


class BatchBoundError(ParameterError):
    """One row of the request is longer than the execution bound allows: the client's request is too
    large for this deployment (INVALID_ARG naming LATENTS), not a fault of the model."""

    def __init__(self, message: str) -> None:
        super().__init__("LATENTS", message)


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of request `request`."""

    request: int
    start: int
    stop: int


def request_length(spec: ComponentSpec, inputs: Mapping[str, torch.Tensor]) -> int:
    """The length one row of this request costs: its first ragged input's variable axis (1 if none)."""
    if not spec.ragged_inputs:
        return 1
    tensor = spec.input(spec.ragged_inputs[0])
    return int(inputs[tensor.name].shape[1 + tensor.dims.index(-1)])


def plan_sub_batches(sizes: Sequence[tuple[int, int]], bound: int | None) -> tuple[list[list[Part]], list[int]]:
    """Cut requests of (rows, length) into sub-batches with rows x longest length <= bound.

    Returns the sub-batches in order, and the indices of requests that cannot run (length > bound).
    With no bound every request runs in one batch.
    """
    if bound is None:
        return [[Part(i, 0, rows) for i, (rows, _) in enumerate(sizes)]] if sizes else [], []
    if bound < 1:
        raise ValueError(f"bound must be >= 1, got {bound}")
    batches: list[list[Part]] = []
    too_long = []
    current: list[Part] = []
    rows = longest = 0
    for index, (count, length) in enumerate(sizes):
        if length > bound:
            too_long.append(index)
            continue
        start = 0
        while start < count:
            width = max(longest, length)
            fit = min(count - start, bound // width - rows)
            if fit <= 0:
                batches.append(current)
                current, rows, longest = [], 0, 0
                continue
            current.append(Part(index, start, start + fit))
            rows, longest, start = rows + fit, width, start + fit
    if current:
        batches.append(current)
    return batches, too_long


def _rows(inputs: Mapping[str, torch.Tensor], part: Part) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of every input (a tensor, or a list with one entry per row)."""
    return {name: value[part.start : part.stop] for name, value in inputs.items()}


def run_bounded(
    run: Run, spec: ComponentSpec, requests: Sequence[Mapping[str, torch.Tensor]], bound: int | None,
    collate: Collate = collate,
) -> list[dict[str, torch.Tensor] | Exception]:
    """Outputs per request (split to its rows and lengths), or the exception that failed it.

    `collate` batches a sub-batch's parts (batching.collate; dit_step's also joins its per-row
    conditions); the spec's first input's first axis counts a request's rows."""
    sizes = [(int(r[spec.inputs[0].name].shape[0]), request_length(spec, r)) for r in requests]
    batches, too_long = plan_sub_batches(sizes, bound)
    failed: dict[int, Exception] = {
        i: BatchBoundError(f"a row of {sizes[i][1]} frames exceeds this model's bound of {bound} rows x frames")
        for i in too_long
    }
    pieces: dict[int, list[dict[str, torch.Tensor]]] = {i: [] for i in range(len(requests))}
    for batch in batches:
        parts = [p for p in batch if p.request not in failed]
        if not parts:
            continue
        inputs = [_rows(requests[p.request], p) for p in parts]
        try:
            outputs = split(spec, inputs, run(collate(spec, inputs)))
        except Exception as exc:  # this sub-batch's requests fail, the others and the instance go on
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            for p in parts:
                failed[p.request] = exc
            continue
        for p, out in zip(parts, outputs):
            pieces[p.request].append(out)
    results: list[dict[str, torch.Tensor] | Exception] = []
    for i in range(len(requests)):
        if i in failed:
            results.append(failed[i])
        elif len(pieces[i]) == 1:
            results.append(pieces[i][0])
        else:
            results.append({name: torch.cat([p[name] for p in pieces[i]]) for name in pieces[i][0]})
    return results
