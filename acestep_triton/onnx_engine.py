"""OnnxEngine: a component's exported ONNX graph run by ONNX Runtime, interchangeable with TorchEngine.

Used by the Triton python models of the `onnx` profile. The graph's I/O names are the spec's
(export/onnx_export.py writes them so); `load` refuses a graph whose inputs or outputs differ,
which is what a stale export after a spec change looks like.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort
import torch

from acestep_triton.specs import ComponentSpec

NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64,
                "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_}
# ONNX Runtime's warnings at load (constant folding it skipped) say nothing about the results.
ORT_LOG_ERRORS_ONLY = 3


def providers_for(device: str) -> list:
    """ONNX Runtime providers for "cpu", "cuda" or "cuda:N"; a clear error if CUDA's is not installed."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind != "cuda":
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"device {device!r}: this onnxruntime has no CUDAExecutionProvider (available: "
            f"{ort.get_available_providers()}); install onnxruntime-gpu instead of onnxruntime (docker/ does)"
        )
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


class OnnxEngine:
    """An ONNX Runtime session for one component spec: run({input: tensor}) -> {output: float32 tensor}."""

    def __init__(self, spec: ComponentSpec, session: ort.InferenceSession) -> None:
        self.spec, self.session = spec, session
        self.output_names = [t.name for t in spec.outputs]

    @classmethod
    def load(cls, path: str | os.PathLike, spec: ComponentSpec, device: str = "cpu") -> OnnxEngine:
        """Open the graph at `path` (its `.data` file beside it) on `device`; check its I/O names against `spec`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{spec.name}: no ONNX graph at {path}; export it with "
                f"`python -m export.onnx_export --checkpoint DIR --out DIR --components {spec.name}`"
            )
        options = ort.SessionOptions()
        options.log_severity_level = ORT_LOG_ERRORS_ONLY
        session = ort.InferenceSession(os.fspath(path), options, providers=providers_for(device))
        graph_inputs = [i.name for i in session.get_inputs()]
        graph_outputs = [o.name for o in session.get_outputs()]
        wanted_inputs, wanted_outputs = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        if graph_inputs != wanted_inputs or graph_outputs != wanted_outputs:
            raise ValueError(
                f"{spec.name}: {path} has inputs {graph_inputs} and outputs {graph_outputs}, the spec wants "
                f"{wanted_inputs} and {wanted_outputs}; re-export it with `python -m export.onnx_export ... --force`"
            )
        return cls(spec, session)

    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One inference; inputs are cast to the spec's dtypes, outputs come back as float32 CPU tensors."""
        feeds = {}
        for t in self.spec.inputs:
            if t.name not in batch:
                raise ValueError(f"{self.spec.name}: missing input {t.name}")
            value = batch[t.name].detach().to("cpu").numpy()
            feeds[t.name] = np.ascontiguousarray(value, dtype=NUMPY_DTYPES[t.dtype])
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(np.asarray(out, dtype=np.float32))
                for name, out in zip(self.output_names, outputs)}
