"""Glue between Triton's python backend and the package, shared by every model.py.

Only importable inside the python backend stub (it imports `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from acestep_triton.adapters import AdapterSettings
from acestep_triton.contract import ENSEMBLE_INPUTS, TASK_INPUTS, GenerationParams, ParameterError, SourceAudio
from acestep_triton.phase_log import PhaseLog
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT

log = logging.getLogger("acestep_triton")

def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def input_array(request, name: str) -> np.ndarray | None:
    """A host input as numpy: for BYTES (strings) and BOOL tensors, which DLPack cannot carry.

    The python backend refuses BYTES in DLPack, and it labels BOOL as 1-bit integers, which torch
    does not read; both are small request parameters that always arrive in host memory.
    """
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def input_tensor(request, name: str) -> torch.Tensor | None:
    """A numeric input as a torch tensor through DLPack, zero-copy, on whichever device it arrived.

    A model whose config sets FORCE_CPU_ONLY_INPUT_TENSORS=no gets GPU inputs as CUDA tensors, so
    nothing crosses the host; otherwise (and on the cpu profile) the tensor views the request's
    shared memory. Either way it is valid only until execute() returns: copy what must outlive it.
    """
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else torch.from_dlpack(tensor.to_dlpack())


def input_tensors(request, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Named numeric inputs as torch tensors (input_tensor); ParameterError when one is missing."""
    out = {}
    for name in names:
        value = input_tensor(request, name)
        if value is None:
            raise ParameterError(name, "missing input tensor")
        out[name] = value
    return out


def output_tensor(name: str, value: torch.Tensor | np.ndarray):
    """A pb_utils.Tensor for a torch tensor (through DLPack, so a CUDA tensor stays on the GPU) or a
    numpy array (strings and bools, which DLPack cannot carry).

    The pb_utils.Tensor holds the DLPack capsule, which keeps the torch storage alive until the
    python backend has copied it out (into the response's buffer, or through CUDA IPC for a BLS
    input): the caller must not write to `value` afterwards.
    """
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.detach().contiguous()))


def synchronize(outputs: Iterable[torch.Tensor | np.ndarray]) -> None:
    """Wait until the devices of the CUDA tensors among `outputs` finished writing them."""
    for device in {v.device for v in outputs if isinstance(v, torch.Tensor) and v.is_cuda}:
        torch.cuda.synchronize(device)


def handoff(outputs: Mapping[str, torch.Tensor | np.ndarray]) -> list:
    """pb_utils.Tensors for `outputs`, after the device finished writing them.

    Another process (the server, or the model a BLS call reaches) reads CUDA outputs through its
    own stream, which does not wait for ours: synchronise once before handing them over.
    """
    synchronize(outputs.values())
    return [output_tensor(name, value) for name, value in outputs.items()]


def response(outputs: Mapping[str, torch.Tensor | np.ndarray]):
    return pb_utils.InferenceResponse(output_tensors=handoff(outputs))


def error_response(exc: BaseException, request_id: str = ""):
    """The error response for `exc`: the client's fault (ParameterError, naming the field) ->
    INVALID_ARG with its message; a condition cache miss -> NOT_FOUND (the loop re-sends); out of
    GPU memory -> UNAVAILABLE (a retry may fit); the loop's dit_step call failing -> INTERNAL with
    dit_step's own message (Triton's text, e.g. that its stub process died); anything else, a
    ValueError of our own code included, -> INTERNAL without internals (logged with its traceback and
    `request_id`, the client's id of the request)."""
    from acestep_triton.bls_loop import DitStepError
    from acestep_triton.condition_cache import ConditionMiss

    if isinstance(exc, ConditionMiss):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.NOT_FOUND))
    if isinstance(exc, ParameterError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        )
    log.error("request %s failed", request_id or "-", exc_info=exc)
    if isinstance(exc, DitStepError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError("out of GPU memory for this batch; retry", pb_utils.TritonError.UNAVAILABLE)
        )
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
    if isinstance(item, np.float32):
        # The shortest decimal that rounds to this float32: the number the client wrote (up to 7
        # significant digits), so the tasks' double-precision truncations (int(8 * (1 - 0.7)),
        # int(10 * 0.7)) give what they give in process and upstream, not what 0.69999999 gives.
        return float(str(item))
    return item.item()


def request_params(request) -> GenerationParams:
    """GenerationParams from the ensemble inputs present on this request (validated).

    A model that sees only some inputs (the diffusion loop gets no prompt) keeps the
    contract defaults for the others; so does a request without the optional task inputs.
    """
    kwargs = {}
    for spec in (*ENSEMBLE_INPUTS, *TASK_INPUTS):
        if not spec.param:
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


def request_source(request) -> SourceAudio | None:
    """The request's source audio (SRC_AUDIO [channels, samples] at SRC_SAMPLE_RATE Hz), None without.

    tasks.check_source judges it against the task; here only that the two come together.
    """
    samples, rate = input_tensor(request, "SRC_AUDIO"), input_array(request, "SRC_SAMPLE_RATE")
    if samples is None and rate is None:
        return None
    if samples is None or rate is None:
        raise ParameterError("SRC_AUDIO", "SRC_AUDIO and SRC_SAMPLE_RATE come together")
    try:
        sample_rate = int(_scalar(rate))
    except ValueError as exc:
        raise ParameterError("SRC_SAMPLE_RATE", str(exc)) from None
    return SourceAudio(samples.cpu().numpy(), sample_rate)


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
    adapters = AdapterSettings.from_parameters(params) if "ADAPTERS_DIR" in params else None
    low_vram = params.get("LOW_VRAM", "0") == "1"
    return TorchEngine.load(name, ckpt, params.get("DEVICE", "cpu"), dtype, accelerate, adapters, low_vram)


class ComponentModel:
    """A neural component under dynamic batching: the requests of one execute() run as one batch,
    cut into sub-batches of at most MAX_ROW_FRAMES rows x frames when the config sets it
    (acestep_triton.sub_batches).

    Subclasses name the component and may override `request_inputs` and `run`; everything else comes
    from the config parameters (CHECKPOINT, DEVICE, DTYPE, ENGINE, ONNX_PATH, ACCELERATE, MAX_ROW_FRAMES,
    ADAPTERS_DIR / ADAPTERS_HUB / MAX_ADAPTERS for a component that serves LoRA adapters, and the
    lowvram profile's LOW_VRAM, OFFLOAD_WEIGHTS, RELEASE_CACHE, GPU_LOCK: acestep_triton.low_vram; with
    GPU_LOCK a stage's time includes its wait for the GPU). A request that fails (bad input, an adapter
    that does not load, out of memory in its sub-batch) gets its own error response.

    Outputs go back where the request's tensors came from: a request whose tensors all arrived in
    host memory (a loop on the CPU, a client, a stage fed by the CPU) gets host tensors, so that its
    sender never holds a CUDA tensor. A CPU process handed one creates a CUDA context for it (~0.5 GiB
    of GPU memory per process, and ~0.3 s at its first use: the gpu profile's 16 CPU loops held
    8 GiB that way on the H200). Requests from the GPU get their outputs on the GPU. Host outputs are
    copied out inside the execution's memory turn, so that the lowvram profile's released cache
    keeps none of them on the GPU.
    """

    component = ""

    def initialize(self, args: Mapping[str, str]) -> None:
        from acestep_triton.contract import stage_time_name
        from acestep_triton.low_vram import ExecutionMemory

        params = model_parameters(args)
        if params.get("DEVICE") == "cuda":  # the GPU Triton placed it on (instance_group gpus; 0 for KIND_CPU)
            params["DEVICE"] = f"cuda:{args['model_instance_device_id']}"
            torch.cuda.set_device(params["DEVICE"])
        self.engine = _engine(self.component, params)
        self.spec = self.engine.spec
        self.device = torch.device(params.get("DEVICE", "cpu"))
        self.dtype = getattr(torch, params.get("DTYPE", "float32"))
        self.max_row_frames = int(params["MAX_ROW_FRAMES"]) if "MAX_ROW_FRAMES" in params else None
        self.time_name = stage_time_name(self.component)
        self.phases = PhaseLog(self.component)
        # the lowvram profile's settings around each execution (none unless its config sets them);
        # the model's folder is args["model_repository"], its parent the repository
        self.memory = ExecutionMemory.from_parameters(params, self.engine, Path(args["model_repository"]).parent)

    def request_inputs(self, request) -> dict[str, torch.Tensor]:
        """The spec's inputs of one request, where they arrived, and for an engine with LoRA adapters its
        rows' adapters (AdapterStore.wire_rows: loaded now, so that an adapter that does not fit fails
        its own request only)."""
        tensors = input_tensors(request, [t.name for t in self.spec.inputs])
        adapters = getattr(self.engine, "adapters", None)
        if adapters is None:
            return tensors
        rows = next(iter(tensors.values())).shape[0]
        names, weights = input_array(request, ADAPTER), input_tensor(request, ADAPTER_WEIGHT)
        return {**tensors, **adapters.wire_rows(names, weights, rows)}

    def run(self, inputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor] | Exception]:
        """Outputs per request of one execute() (or the exception that failed it): bounded sub-batches."""
        from acestep_triton.sub_batches import run_bounded

        return run_bounded(self.engine.run, self.spec, inputs, self.max_row_frames)

    def execute(self, requests):
        """Phases (PhaseLog): inputs (reading the requests), run (the host's work up to the last
        launch), gpu (waiting for the device to finish), respond (building the responses)."""
        self.phases.start()
        responses: list = [None] * len(requests)
        inputs: dict[int, dict[str, torch.Tensor]] = {}
        from_host: dict[int, bool] = {}
        for i, request in enumerate(requests):
            try:
                arrived = self.request_inputs(request)
            except Exception as exc:  # this request fails, the others run
                responses[i] = error_response(exc)
                continue
            tensors = [v for v in arrived.values() if isinstance(v, torch.Tensor)]
            from_host[i] = all(not t.is_cuda for t in tensors)
            inputs[i] = {name: v.to(self.device) if isinstance(v, torch.Tensor) else v for name, v in arrived.items()}
        self.phases.mark("inputs")
        start = time.perf_counter()
        indices = list(inputs)
        with self.memory.turn():
            results = self.run([inputs[i] for i in indices])
            self.phases.mark("run")
            synchronize(v for result in results if not isinstance(result, Exception) for v in result.values())
            self.phases.mark("gpu")
            results = [result if isinstance(result, Exception) or not from_host[i]
                       else {name: value.cpu() for name, value in result.items()}
                       for i, result in zip(indices, results)]
        elapsed = np.float32(time.perf_counter() - start)
        for i, result in zip(indices, results):
            if isinstance(result, Exception):
                responses[i] = error_response(result)
                continue
            rows = next(iter(result.values())).shape[0]
            result[self.time_name] = np.full((rows, 1), elapsed, dtype=np.float32)
            responses[i] = response(result)
        self.phases.mark("respond")
        self.phases.write(requests=len(requests), rows=sum(int(next(iter(r.values())).shape[0])
                                                          for r in results if not isinstance(r, Exception)))
        return responses
