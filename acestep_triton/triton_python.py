"""Glue between Triton's python backend and the package, shared by every model.py.

Only importable inside the python backend stub (it imports `triton_python_backend_utils`).
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


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def input_array(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def input_tensors(request, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Named inputs as CPU torch tensors (zero-copy where the dtype allows)."""
    out = {}
    for name in names:
        array = input_array(request, name)
        if array is None:
            raise ParameterError(name, "missing input tensor")
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").numpy()
    return np.asarray(value)


def response(outputs: Mapping[str, object]):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, _as_numpy(value)) for name, value in outputs.items()]
    )


def error_response(exc: BaseException):
    """The client's fault (ParameterError, naming the field) -> INVALID_ARG with its message; anything
    else, a ValueError of our own code included, -> INTERNAL without internals (they go to the log)."""
    if isinstance(exc, ParameterError):
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


def request_params(request) -> GenerationParams:
    """GenerationParams from the ensemble inputs present on this request (validated).

    A model that sees only some inputs (the diffusion loop gets no prompt) keeps the
    contract defaults for the others.
    """
    kwargs = {}
    for spec in ENSEMBLE_INPUTS:
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
    from acestep_triton.checkpoint import deployment_checkpoint
    from acestep_triton.registry import component_spec

    ckpt = deployment_checkpoint(params["CHECKPOINT"])
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
