"""Glue between Triton's python backend and the package, shared by every model.py.

Only importable inside the python backend stub (it imports `triton_python_backend_utils`).

Tensors leave a model through DLPack, and arrays that come in are re-strided: the python
backend of nvidia-pytriton 0.7.0 builds numpy arrays through a pybind11 that predates numpy 2,
and under numpy 2 it reads the element size from the wrong descriptor field (every stride 0,
so every element reads as the first). Data pointers and shapes stay right; under numpy 1 both
measures change nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from acestep_triton.contract import ENSEMBLE_INPUTS, GenerationParams, ParameterError

log = logging.getLogger("acestep_triton")


def c_contiguous(array: np.ndarray) -> np.ndarray:
    """`array` viewed with C-contiguous strides (a no-op unless the stub mis-strided it)."""
    strides, step = [], array.itemsize
    for size in reversed(array.shape):
        strides.append(step)
        step *= size
    strides = tuple(reversed(strides))
    if array.ndim == 0 or array.strides == strides:
        return array
    return np.lib.stride_tricks.as_strided(array, array.shape, strides)


_deserialize_bytes_tensor = pb_utils.deserialize_bytes_tensor


def _deserialize_restrided(encoded):
    """pb_utils' BYTES decoder, fed a correctly strided view of the serialized buffer."""
    return _deserialize_bytes_tensor(c_contiguous(encoded) if isinstance(encoded, np.ndarray) else encoded)


# The stub looks the decoder up on the module for every BYTES tensor it reads.
pb_utils.deserialize_bytes_tensor = _deserialize_restrided


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def input_array(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else c_contiguous(tensor.as_numpy())


def input_tensors(request, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Named inputs as CPU torch tensors (zero-copy where the dtype allows)."""
    out = {}
    for name in names:
        array = input_array(request, name)
        if array is None:
            raise ParameterError(name, "missing input tensor")
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def triton_tensor(name: str, value) -> object:
    """A pb_utils.Tensor from a torch tensor or numeric array, handed over through DLPack."""
    if not isinstance(value, torch.Tensor):
        value = torch.from_numpy(np.ascontiguousarray(value))
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.detach().contiguous()))


def output_tensor(response_or_request, name: str) -> torch.Tensor:
    """A BLS response's output as a torch tensor (DLPack, no numpy)."""
    return torch.from_dlpack(pb_utils.get_output_tensor_by_name(response_or_request, name).to_dlpack())


def response(outputs: Mapping[str, object]):
    return pb_utils.InferenceResponse(
        output_tensors=[triton_tensor(name, value) for name, value in outputs.items()]
    )


def error_response(exc: BaseException):
    """Bad input -> INVALID_ARG with its message; anything else -> INTERNAL without internals."""
    if isinstance(exc, (ParameterError, ValueError)):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        )
    log.exception("request failed")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"internal error ({type(exc).__name__}); see the server log")
    )


def _scalar(array: np.ndarray):
    value = array.reshape(-1)
    if value.size != 1:
        raise ValueError(f"expected one value, got shape {list(array.shape)}")
    item = value[0]
    if isinstance(item, bytes):
        return item.decode("utf-8")
    return item.item()


def request_params(request, fields: Iterable[str] | None = None) -> GenerationParams:
    """GenerationParams from the ensemble inputs present on this request (validated).

    Models that see only some inputs (the diffusion loop gets no prompt) pass `fields`;
    the others keep their contract defaults.
    """
    wanted = set(fields) if fields is not None else None
    kwargs = {}
    for spec in ENSEMBLE_INPUTS:
        if wanted is not None and spec.param not in wanted:
            continue
        array = input_array(request, spec.name)
        if array is None:
            continue
        try:
            if spec.dims == (-1,):
                kwargs[spec.param] = tuple(int(v) for v in array.reshape(-1))
            else:
                value = _scalar(array)
                kwargs[spec.param] = bool(value) if spec.dtype == "TYPE_BOOL" else value
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParameterError(spec.param, str(exc)) from None
    kwargs.setdefault("prompt", "")
    kwargs.setdefault("lyrics", "")
    return GenerationParams(**kwargs)


def _engine(name: str, params: Mapping[str, str]):
    """The engine a component model's config parameters ask for."""
    from acestep_triton.checkpoint import validate_checkpoint
    from acestep_triton.specs import component_spec

    ckpt = validate_checkpoint(params["CHECKPOINT"])
    if params.get("ENGINE", "pytorch") == "onnx":
        from acestep_triton.onnx_engine import OnnxEngine

        return OnnxEngine.load(params["ONNX_PATH"], component_spec(name, ckpt), device=params.get("DEVICE", "cpu"))
    from acestep_triton.engines import TorchEngine

    dtype = getattr(torch, params.get("DTYPE", "float32"))
    accelerate = params.get("ACCELERATE", "0") == "1"
    return TorchEngine.load(name, ckpt, params.get("DEVICE", "cpu"), dtype, accelerate)


class ComponentModel:
    """A neural component under dynamic batching: the requests of one execute() run as one batch.

    Subclasses name the component; everything else comes from the config parameters
    (CHECKPOINT, DEVICE, DTYPE, ENGINE, ONNX_PATH, ACCELERATE).
    """

    component = ""

    def initialize(self, args: Mapping[str, str]) -> None:
        from acestep_triton.contract import stage_time_name

        self.engine = _engine(self.component, model_parameters(args))
        self.spec = self.engine.spec
        self.time_name = stage_time_name(self.component)

    def execute(self, requests):
        import time

        from acestep_triton.batching import collate, split

        try:
            inputs = [input_tensors(r, [t.name for t in self.spec.inputs]) for r in requests]
            start = time.perf_counter()
            outputs = self.engine.run(collate(self.spec, inputs))
            parts = split(self.spec, inputs, outputs)
            elapsed = np.float32(time.perf_counter() - start)
        except Exception as exc:  # one failed batch fails each of its requests, the server stays up
            return [error_response(exc) for _ in requests]
        responses = []
        for part in parts:
            rows = next(iter(part.values())).shape[0]
            part[self.time_name] = np.full((rows, 1), elapsed, dtype=np.float32)
            responses.append(response(part))
        return responses
