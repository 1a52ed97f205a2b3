"""Triton model specs -> `ModelConfig` protobuf -> config.pbtxt.

A `ModelSpec` names one Triton model: its backend (or platform), batching,
tensors (`acestep_triton.contract.TensorSpec`, dims without the batch axis when
max_batch_size > 0), instances, string parameters and, for an ensemble, its
steps. `to_model_config` builds a plain dict, parses it into Triton's
`ModelConfig` message (which rejects unknown fields and enum values) and
`write_model` prints it with protobuf's text format.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from acestep_triton.contract import TensorSpec

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_MODEL", "KIND_AUTO")
ENSEMBLE_PLATFORM = "ensemble"


@dataclass(frozen=True)
class DynamicBatching:
    """Dynamic batcher: preferred batch sizes and how long a request may wait for company."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0


@dataclass(frozen=True)
class InstanceGroup:
    """`count` instances of the model on `kind` (on each of `gpus` for KIND_GPU, all GPUs when empty).

    `profiles` names the TensorRT optimisation profiles an instance may use (all of an engine's
    profiles must be listed, or Triton uses the first only).
    """

    kind: str = "KIND_CPU"
    count: int = 1
    gpus: tuple[int, ...] = ()
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnsembleStep:
    """One composing model call; maps are {composing model tensor: ensemble tensor}."""

    model_name: str
    input_map: Mapping[str, str]
    output_map: Mapping[str, str]
    model_version: int = -1


@dataclass(frozen=True)
class ModelSpec:
    """One Triton model. Exactly one of `backend` ("python", "onnxruntime", ...) or `platform`."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    backend: str = ""
    platform: str = ""
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    ragged_inputs: frozenset[str] = frozenset()
    # inputs a request may leave out (the model reads them as absent), beside those whose
    # TensorSpec says `optional`
    optional_inputs: frozenset[str] = frozenset()
    instance_group: InstanceGroup | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    ensemble_steps: tuple[EnsembleStep, ...] = ()
    decoupled: bool = False  # any number of responses per request (model_transaction_policy)

    def __post_init__(self) -> None:
        if bool(self.backend) == bool(self.platform):
            raise ValueError(f"{self.name}: set exactly one of backend or platform")
        if self.max_batch_size < 0:
            raise ValueError(f"{self.name}: max_batch_size must be >= 0")
        if self.max_batch_size == 0 and (self.dynamic_batching or self.ragged_inputs):
            raise ValueError(f"{self.name}: dynamic_batching and ragged_inputs need max_batch_size > 0")
        for field_name in ("ragged_inputs", "optional_inputs"):
            unknown = set(getattr(self, field_name)) - {t.name for t in self.inputs}
            if unknown:
                raise ValueError(f"{self.name}: {field_name} names unknown inputs {sorted(unknown)}")
        if (self.platform == ENSEMBLE_PLATFORM) != bool(self.ensemble_steps):
            raise ValueError(f"{self.name}: platform '{ENSEMBLE_PLATFORM}' and ensemble_steps go together")
        if self.instance_group is not None and self.instance_group.kind not in INSTANCE_KINDS:
            raise ValueError(f"{self.name}: instance_group.kind must be one of {INSTANCE_KINDS}")
        for name in ("inputs", "outputs"):
            tensors = getattr(self, name)
            if len({t.name for t in tensors}) != len(tensors):
                raise ValueError(f"{self.name}: duplicate tensor names in {name}")


def _tensor(spec: TensorSpec, ragged: bool, optional: bool = False) -> dict[str, Any]:
    if spec.dtype not in model_config_pb2.DataType.keys():
        raise ValueError(f"tensor {spec.name}: unknown Triton dtype {spec.dtype!r}")
    entry: dict[str, Any] = {"name": spec.name, "data_type": spec.dtype, "dims": [str(d) for d in spec.dims]}
    if ragged:
        entry["allow_ragged_batch"] = True
    if optional:
        entry["optional"] = True
    return entry


def to_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """The spec as a dict in `ModelConfig`'s JSON field names."""
    config: dict[str, Any] = {
        "name": spec.name,
        "max_batch_size": spec.max_batch_size,
        "input": [_tensor(t, t.name in spec.ragged_inputs, t.optional or t.name in spec.optional_inputs)
                  for t in spec.inputs],
        "output": [_tensor(t, False) for t in spec.outputs],
    }
    if spec.backend:
        config["backend"] = spec.backend
    else:
        config["platform"] = spec.platform
    if spec.dynamic_batching is not None:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(spec.dynamic_batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": str(spec.dynamic_batching.max_queue_delay_us),
        }
    if spec.instance_group is not None:
        group: dict[str, Any] = {"kind": spec.instance_group.kind, "count": spec.instance_group.count}
        if spec.instance_group.gpus:
            group["gpus"] = list(spec.instance_group.gpus)
        if spec.instance_group.profiles:
            group["profile"] = list(spec.instance_group.profiles)
        config["instance_group"] = [group]
    if spec.decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    if spec.parameters:
        config["parameters"] = {k: {"string_value": str(v)} for k, v in spec.parameters.items()}
    if spec.ensemble_steps:
        config["ensemble_scheduling"] = {
            "step": [
                {
                    "model_name": step.model_name,
                    "model_version": str(step.model_version),
                    "input_map": dict(step.input_map),
                    "output_map": dict(step.output_map),
                }
                for step in spec.ensemble_steps
            ]
        }
    return config


def to_model_config(spec: ModelSpec) -> model_config_pb2.ModelConfig:
    """The spec as Triton's `ModelConfig` message."""
    return json_format.ParseDict(to_config_dict(spec), model_config_pb2.ModelConfig())


def to_pbtxt(spec: ModelSpec) -> str:
    """config.pbtxt text for the spec."""
    return text_format.MessageToString(to_model_config(spec))


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt back into `ModelConfig`."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def write_model(spec: ModelSpec, repo_dir: Path, model_py: Path | None = None) -> Path:
    """Write `<repo_dir>/<name>/config.pbtxt` and version dir `1/` (with `model.py` when given).

    Returns the model directory. Python-backend models need `model_py`, which is left alone when
    it already is that file (regenerating the committed model_repository/ in place).
    """
    if spec.backend == "python" and model_py is None:
        raise ValueError(f"{spec.name}: a python-backend model needs model_py")
    model_dir = Path(repo_dir) / spec.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(to_pbtxt(spec))
    target = version_dir / "model.py"
    if model_py is not None and not (target.exists() and target.samefile(model_py)):
        shutil.copyfile(model_py, target)
    return model_dir
