"""`dit_step`'s request handling without Triton: conditions by key, prepared once, bounded sub-batches.

One `DitStep` serves every caller of the transformer's step: the Triton model
(model_repository/dit_step, one execute() of dynamically batched requests), the in-process
pipeline (one request per loop step, through the same bls_loop.StepLoop as the served loop) and
the tests. A request is the wire form of one `dit_step` call: the spec's tensors by name, the
conditions (ENCODER_STATES / ENCODER_MASK) optional when CONDITION_KEY [N, 1] (BYTES) names rows
this instance holds, CONDITION_RELEASE [N, 1] (BOOL) freeing them (acestep_triton.condition_cache
has the semantics).

Each request's conditions are resolved to one ConditionRow per batch row: for a PyTorch engine the
rows are the transformer's prepared cross-attention keys/values (`DiTStepComponent.prepare`, once
per key), which `DiTStepComponent.decode_rows` decodes from directly; for other engines (ONNX) they
are the encoder states, stacked back into the spec's ENCODER_STATES / ENCODER_MASK.

LoRA adapters (a PyTorch engine with an AdapterStore): a request's rows name their adapter by the
optional ADAPTER / ADAPTER_WEIGHT [N, 1] (specs.ADAPTER_INPUTS; absent: the base model), turned into
specs.ADAPTER_ROWS here. A row's prepared keys/values come out of its adapted cross-attention
projections, so they are prepared under its own adapter (the loop's keys name adapter and weight:
condition_cache.ConditionKey), and the decode runs each row with its adapter
(TorchEngine.adapted): one request's adapter never touches another's rows of the same batch.

The rows of all requests then run in sub-batches of at most `max_row_frames` rows x frames (sub_batches.run_bounded);
a request that fails (bad input, a miss, out of memory in its sub-batch) gets its exception and
frees its keys, the others are answered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from acestep_triton.batching import collate
from acestep_triton.components import DiTStepComponent
from acestep_triton.condition_cache import (
    ConditionCache,
    ConditionRow,
    condition_rows,
    decode_keys,
    request_conditions,
    stack_rows,
)
from acestep_triton.contract import ParameterError
from acestep_triton.phase_log import PhaseLog
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT, CONDITION_KEY, CONDITION_RELEASE, KEYED_INPUTS
from acestep_triton.sub_batches import run_bounded

# The batch entry that holds each row's ConditionRow (a list, sliced and joined like the tensors).
ROWS = "CONDITION_ROWS"

Request = Mapping[str, "torch.Tensor | np.ndarray | None"]


class DitStep:
    """The transformer's step for a batch of `dit_step` requests, with its condition cache.

    `engine` is a TorchEngine or OnnxEngine of the dit_step component (its `spec`, `run`, and for
    PyTorch its `module`, `device` and `dtype`). `phases` (the served model's) gets `resolve` (the
    conditions looked up, or prepared and stored) and `decode` (the host's work up to the last
    launch) marked per execute.
    """

    def __init__(self, engine, cache: ConditionCache, max_row_frames: int | None = None,
                 phases: PhaseLog | None = None) -> None:
        self.engine, self.cache, self.max_row_frames = engine, cache, max_row_frames
        self.phases = phases
        spec = engine.spec
        # the spec without the keyed inputs: what every request carries as tensors
        self.row_spec = replace(spec, inputs=tuple(t for t in spec.inputs if t.name not in KEYED_INPUTS),
                                ragged_inputs=tuple(n for n in spec.ragged_inputs if n not in KEYED_INPUTS))
        self.module = getattr(engine, "module", None)
        self.prepared = isinstance(self.module, DiTStepComponent)
        self.adapters = getattr(engine, "adapters", None)

    def __call__(self, request: Request) -> dict[str, torch.Tensor]:
        """One request's outputs; its exception (ConditionMiss on a miss) is raised."""
        result = self.execute([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def execute(self, requests: Sequence[Request]) -> list[dict[str, torch.Tensor] | Exception]:
        """Outputs (VELOCITY) per request, or the exception that failed it."""
        results: list[dict[str, torch.Tensor] | Exception | None] = [None] * len(requests)
        ready: dict[int, dict] = {}
        keys: dict[int, list[str] | None] = {}
        with torch.inference_mode():
            for i, request in enumerate(requests):
                try:
                    keys[i] = _keys(request)
                    ready[i] = self._resolve(request, keys[i])
                except Exception as exc:  # this request fails, the others run
                    results[i] = exc
            if self.phases is not None:
                self.phases.mark("resolve")
            order = list(ready)
            outputs = run_bounded(self._run, self.row_spec, [ready[i] for i in order], self.max_row_frames,
                                  collate=self._collate)
            if self.phases is not None:
                self.phases.mark("decode")
        for i, output in zip(order, outputs):
            if isinstance(output, Exception) and keys[i] is not None:
                self.cache.release(keys[i])  # the loop gives up on a failed request
            results[i] = output
        return results

    def _resolve(self, request: Request, keys: list[str] | None) -> dict:
        """The request's row tensors on the engine's device, its adapters (specs.ADAPTER_ROWS, on the host)
        where the engine serves them, and its ConditionRows under ROWS."""
        tensors = {}
        for spec in self.row_spec.inputs:
            value = request.get(spec.name)
            if value is None:
                raise ParameterError(spec.name, "missing input tensor")
            tensors[spec.name] = torch.as_tensor(value).to(self._device, non_blocking=True)
        adapters = {}
        if self.adapters is not None:
            rows = tensors[self.row_spec.inputs[0].name].shape[0]
            adapters = self.adapters.wire_rows(request.get(ADAPTER), request.get(ADAPTER_WEIGHT), rows)
        sent = {name: torch.as_tensor(request[name]).to(self._device, non_blocking=True)
                for name in KEYED_INPUTS if request.get(name) is not None}
        release = request.get(CONDITION_RELEASE)
        flags = None if release is None else np.asarray(release).reshape(-1).tolist()
        prepare = partial(self._prepare, adapters)
        return {**tensors, **adapters, ROWS: request_conditions(self.cache, sent, keys, flags, prepare)}

    @property
    def _device(self) -> torch.device:
        return getattr(self.engine, "device", torch.device("cpu"))

    def _prepare(self, adapters: Mapping[str, torch.Tensor], states: torch.Tensor, mask: torch.Tensor,
                 rows: Sequence[int]) -> list[ConditionRow]:
        """condition_cache.Prepare for one request whose rows use `adapters` (specs.ADAPTER_ROWS, or none)."""
        if not self.prepared:
            return condition_rows(states, mask)
        with self.engine.adapted({name: value[list(rows)] for name, value in adapters.items()}):
            return self.module.prepare(states.to(self.engine.dtype), mask.to(self.engine.dtype))

    def _collate(self, spec, parts: Sequence[Mapping]) -> dict:
        return {**collate(spec, parts), ROWS: [row for part in parts for row in part[ROWS]]}

    def _run(self, batch: Mapping) -> dict[str, torch.Tensor]:
        if not self.prepared:
            states, mask = stack_rows(batch[ROWS], 0.0)
            inputs = {name: value for name, value in batch.items() if name != ROWS}
            return self.engine.run({**inputs, "ENCODER_STATES": states, "ENCODER_MASK": mask})
        dtype = self.engine.dtype
        with self.engine.adapted(batch):
            velocity = self.module.decode_rows(batch["LATENTS"].to(dtype), batch["ATTENTION_MASK"].to(dtype),
                                               batch[ROWS], batch["TIMESTEP"][:, 0].to(dtype),
                                               batch["Q_SCALE"][:, 0].to(dtype))
        return {"VELOCITY": velocity.float()}


def _keys(request: Request) -> list[str] | None:
    array = request.get(CONDITION_KEY)
    return None if array is None else decode_keys(np.asarray(array))
