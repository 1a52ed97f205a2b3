"""The `acestep` ensemble as a Triton client sees it: request tensors from GenerationParams, and a
GenerationResult from the answer.

Shared by the gateway, the tests and the benchmarks, so that the wire dtypes and the output names
are derived from contract.py in one place. Torch-free (the gateway imports it). Works with any of
tritonclient's modules (grpc, http, and their asyncio variants): they differ in the InferInput
class only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from acestep_triton.contract import (
    AUDIO_CHUNK,
    AUDIO_OFFSET,
    AUDIO_SAMPLES,
    ENSEMBLE_INPUTS,
    FIELD_DEFAULTS,
    STAGES,
    TASK_INPUTS,
    GenerationParams,
    GenerationResult,
    SourceAudio,
    TensorSpec,
    stage_time_name,
)


class MalformedAnswer(RuntimeError):
    """Triton answered, but not with what the contract says the ensemble returns."""


def wire_dtype(spec: TensorSpec) -> str:
    """Config spelling (TYPE_STRING, TYPE_FP32) to wire spelling (BYTES, FP32)."""
    name = spec.dtype.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _array(spec: TensorSpec, value) -> np.ndarray:
    values = list(value) if spec.dims == (-1,) else [value]
    if spec.dtype == "TYPE_STRING":
        return np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    return np.array(values, dtype=triton_to_np_dtype(wire_dtype(spec)))


def input_arrays(params: GenerationParams, source: SourceAudio | None = None) -> dict[str, np.ndarray]:
    """One array per ensemble input: [1] for scalars, [n] for lists; strings as UTF-8 bytes.

    The task inputs (contract.TASK_INPUTS) go only where they differ from their defaults, so a
    text2music request is the contract's plain one; `source` (the audio of the tasks that start
    from one) goes as SRC_AUDIO [channels, samples] float32 and SRC_SAMPLE_RATE [1].
    """
    arrays = {spec.name: _array(spec, getattr(params, spec.param)) for spec in ENSEMBLE_INPUTS}
    for spec in TASK_INPUTS:
        if spec.param and getattr(params, spec.param) != FIELD_DEFAULTS[spec.param]:
            arrays[spec.name] = _array(spec, getattr(params, spec.param))
    if source is not None:
        arrays["SRC_AUDIO"] = np.ascontiguousarray(source.samples, dtype=np.float32)
        arrays["SRC_SAMPLE_RATE"] = np.array([source.sample_rate], dtype=np.int32)
    return arrays


def audio_chunk(result) -> tuple[np.ndarray, int, int] | None:
    """A streaming `acestep_stream` response's audio (contract.AUDIO_CHUNK_OUTPUTS): (samples
    [items, 2, n], offset, total samples), or None for a response without audio."""
    audio = result.as_numpy(AUDIO_CHUNK.name)
    if audio is None:
        return None
    offset, total = (int(result.as_numpy(spec.name).reshape(-1)[0]) for spec in (AUDIO_OFFSET, AUDIO_SAMPLES))
    return audio, offset, total


def infer_inputs(client_module: ModuleType, params: GenerationParams,
                 overrides: Mapping[str, np.ndarray] | None = None, source: SourceAudio | None = None) -> list:
    """`client_module.InferInput`s for `params` and `source` (binary tensors over HTTP).

    `overrides` replaces or adds arrays, each sent with its own dtype: how tests send malformed
    requests. No outputs are named by callers that want every output the deployment has (a
    TensorRT deployment leaves out the stage timings its plans cannot measure).
    """
    arrays = {**input_arrays(params, source), **(overrides or {})}
    binary = {"binary_data": True} if client_module.__name__.startswith("tritonclient.http") else {}
    inputs = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, **binary)
        inputs.append(tensor)
    return inputs


def read_result(result, connect_seconds: float = 0.0) -> GenerationResult:
    """The ensemble's answer (an InferResult of any client module), checked against the contract."""
    waveforms = result.as_numpy("WAVEFORM")
    seeds = result.as_numpy("SEEDS")
    duration = result.as_numpy("DURATION")
    if waveforms is None or seeds is None or duration is None:
        raise MalformedAnswer("Triton's answer lacks WAVEFORM, SEEDS or DURATION")
    if waveforms.ndim != 3 or waveforms.shape[1] != 2 or waveforms.shape[0] != seeds.shape[0] or waveforms.shape[0] == 0:
        raise MalformedAnswer(f"WAVEFORM {waveforms.shape} does not match [items, 2, samples] with {seeds.shape[0]} seeds")
    timings = {}
    for stage in STAGES:
        seconds = result.as_numpy(stage_time_name(stage))
        if seconds is not None:  # TensorRT plans cannot time themselves: their stages are left out
            timings[stage] = float(seconds.reshape(-1)[0])
    if "preprocess" not in timings:
        raise MalformedAnswer(f"Triton's answer lacks {stage_time_name('preprocess')}")
    retake_seeds = result.as_numpy("RETAKE_SEEDS_USED")
    return GenerationResult(
        waveforms=np.ascontiguousarray(waveforms, dtype=np.float32),
        seeds=tuple(int(s) for s in seeds.reshape(-1)),
        duration=float(duration.reshape(-1)[0]),
        timings=timings,
        connect_seconds=connect_seconds,
        retake_seeds=() if retake_seeds is None else tuple(int(s) for s in retake_seeds.reshape(-1)),
    )
