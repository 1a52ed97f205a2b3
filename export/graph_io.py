"""An ONNX graph's inputs and outputs as Triton tensors, and where they disagree with a component spec.

The graph is read without its weights (external data stays on disk). Dims are given as Triton
wants them for `max_batch_size > 0`: the first (batch) axis dropped, symbolic axes as -1.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from acestep_triton.contract import TensorSpec
from acestep_triton.specs import ComponentSpec

ONNX_TO_TRITON_DTYPE = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


def _tensor(value: onnx.ValueInfoProto, path: Path) -> tuple[TensorSpec, bool]:
    """(Triton tensor without the batch axis, whether the graph's batch axis is symbolic)."""
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in ONNX_TO_TRITON_DTYPE:
        name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ValueError(f"{path}: tensor {value.name} has ONNX type {name}, which Triton cannot carry")
    dims = [-1 if d.dim_param or not d.HasField("dim_value") else d.dim_value for d in tensor_type.shape.dim]
    if not dims:
        raise ValueError(f"{path}: tensor {value.name} is a scalar; batched Triton tensors need a batch axis")
    return TensorSpec(value.name, ONNX_TO_TRITON_DTYPE[tensor_type.elem_type], tuple(dims[1:])), dims[0] == -1


def _graph(path: str | os.PathLike) -> tuple[onnx.GraphProto, Path]:
    path = Path(path)
    return onnx.load(path, load_external_data=False).graph, path


def triton_io(onnx_path: str | os.PathLike) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the graph as Triton declares them for `platform: "tensorrt_plan"` or
    `"onnxruntime_onnx"` with max_batch_size > 0: names, TYPE_* dtypes, dims without the batch axis
    (-1 where the graph's axis is symbolic)."""
    graph, path = _graph(onnx_path)
    inputs = tuple(_tensor(v, path)[0] for v in graph.input)
    outputs = tuple(_tensor(v, path)[0] for v in graph.output)
    return inputs, outputs


def _mismatches(kind: str, wanted: tuple[TensorSpec, ...], graph_tensors: list[tuple[TensorSpec, bool]]) -> list[str]:
    """Differences of one side ("input" or "output") of the graph from the spec's tensors."""
    got_names = [t.name for t, _ in graph_tensors]
    if got_names != [t.name for t in wanted]:
        return [f"{kind}s are {got_names}, the spec wants {[t.name for t in wanted]}"]
    problems = []
    for want, (got, batch_symbolic) in zip(wanted, graph_tensors):
        where = f"{kind} {want.name}"
        if got.dtype != want.dtype:
            problems.append(f"{where} is {got.dtype}, the spec wants {want.dtype}")
        if not batch_symbolic:
            problems.append(f"{where} has a fixed batch axis")
        if len(got.dims) != len(want.dims):
            problems.append(f"{where} has rank {1 + len(got.dims)}, the spec wants {1 + len(want.dims)}")
        elif got.dims != want.dims:
            problems.append(f"{where} has dims [batch, {', '.join(map(str, got.dims))}], the spec wants "
                            f"[batch, {', '.join(map(str, want.dims))}] (-1 = variable)")
    return problems


def io_mismatches(spec: ComponentSpec, onnx_path: str | os.PathLike) -> list[str]:
    """Every way the graph's I/O differs from the spec: names and order, dtypes, ranks, and each
    axis that the spec has variable (-1) but the graph fixed, or the other way round. Empty if none."""
    graph, path = _graph(onnx_path)
    return (_mismatches("input", spec.inputs, [_tensor(v, path) for v in graph.input])
            + _mismatches("output", spec.outputs, [_tensor(v, path) for v in graph.output]))
