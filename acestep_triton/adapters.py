"""Which LoRA adapter a request names: the adapters directory, hub ids, and the per-row wire tensors.

Torch-free (preprocess, the config generator and the loop read it); the adapters' math and the
resident set are in acestep_triton.lora.

A request's `lora_name_or_path` is `contract.NO_LORA` ("none", the base model) or an adapter name:

- a folder under the deployment's adapters directory (ADAPTERS_DIR_ENV, or the model parameter
  ADAPTERS_DIR that export.build_repository writes) holding ADAPTER_FILE, named by its relative path
  ("my-style" or "group/my-style"). Never a path of the server's: absolute names, "..", empty or
  hidden segments, and anything whose resolved folder lies outside the directory (a symlink out of
  it included) are refused;
- otherwise, where the deployment allows it, a Hugging Face hub repository id "owner/name", whose
  ADAPTER_FILE is downloaded once into the hub cache (offline, or not found: a clear error).

A name that is neither is a ParameterError on `lora_name_or_path`, which clients get as 400 /
INVALID_ARG. The name is checked where the request enters (preprocess) and again where the adapter
is loaded (condition_encoder, dit_step), each process with its own AdapterResolver.

Per-row wire tensors: `preprocess` gives one ADAPTER / ADAPTER_WEIGHT row per guidance branch, the
loop one per `dit_step` row (specs.ADAPTER_INPUTS).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acestep_triton.contract import NO_LORA, ParameterError
from acestep_triton.specs import ADAPTER, ADAPTER_WEIGHT

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
ADAPTERS_DIR_ENV = "ACESTEP_ADAPTERS_DIR"
# The ADAPTERS_DIR model parameter of the committed repository: the deployment sets ADAPTERS_DIR_ENV.
DEPLOYMENT_ADAPTERS_DIR = f"${ADAPTERS_DIR_ENV}"
FIELD = "lora_name_or_path"

# One segment of an adapter's folder name: no leading dot (so no ".", "..", hidden folders).
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# A hub repository id with its namespace, as the hub spells them.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class AdapterSettings:
    """Where adapters come from and how many stay loaded.

    directory: the adapters directory (None: no local adapters).
    hub: whether an "owner/name" missing from the directory is fetched from the Hugging Face hub.
    max_resident: adapters kept loaded per model process; the least recently used one beyond this
        is unloaded (a batch that needs more holds them all while it runs).
    """

    directory: Path | None
    hub: bool = True
    max_resident: int = 4

    def __post_init__(self) -> None:
        if self.max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {self.max_resident}")
        if self.directory is not None and not Path(self.directory).is_dir():
            raise ValueError(f"adapters directory {self.directory} does not exist")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> AdapterSettings:
        """From a Triton model's parameters ADAPTERS_DIR (a directory, or DEPLOYMENT_ADAPTERS_DIR: the
        directory ADAPTERS_DIR_ENV names, none when it is unset), ADAPTERS_HUB ("1"/"0"), MAX_ADAPTERS."""
        directory = params["ADAPTERS_DIR"]
        if directory == DEPLOYMENT_ADAPTERS_DIR:
            directory = os.environ.get(ADAPTERS_DIR_ENV, "")
        return cls(Path(directory) if directory else None, params.get("ADAPTERS_HUB", "1") == "1",
                   int(params.get("MAX_ADAPTERS", "4")))


class AdapterResolver:
    """Adapter names -> the folder holding ADAPTER_FILE, or ParameterError on lora_name_or_path.

    `refusal`, when set, is why this deployment serves no adapters at all (its engine cannot).
    Hub downloads are remembered for the life of the process.
    """

    def __init__(self, settings: AdapterSettings | None, refusal: str = "") -> None:
        self.settings = settings
        self.refusal = refusal
        self._hub: dict[str, Path] = {}

    def folder(self, name: str) -> Path:
        """The folder of adapter `name` (not NO_LORA)."""
        if self.refusal:
            raise ParameterError(FIELD, self.refusal)
        if self.settings is None:
            raise ParameterError(FIELD, f"this deployment serves no adapters (no adapters directory: set "
                                        f"{ADAPTERS_DIR_ENV}); use {NO_LORA!r}")
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
            raise ParameterError(FIELD, f"must be an adapter name, not a path: {name!r}")
        segments = name.split("/")
        if ".." in segments:
            raise ParameterError(FIELD, f"must not contain '..': {name!r}")
        if not all(_SEGMENT.fullmatch(s) for s in segments):
            raise ParameterError(FIELD, f"{name!r} is not an adapter name (folder names of letters, digits, "
                                        f"'_', '-', '.', separated by '/', none starting with '.')")
        local = self._local(name)
        if local is not None:
            return local
        if self.settings.hub and _HUB_ID.fullmatch(name):
            return self._download(name)
        raise ParameterError(FIELD, f"unknown adapter {name!r}: no folder of that name with {ADAPTER_FILE} in the "
                                    f"adapters directory")

    def _local(self, name: str) -> Path | None:
        if self.settings.directory is None:
            return None
        directory = self.settings.directory.resolve()
        folder = (directory / name).resolve()
        if not folder.is_relative_to(directory):
            raise ParameterError(FIELD, f"adapter {name!r} lies outside the adapters directory")
        return folder if (folder / ADAPTER_FILE).is_file() else None

    def _download(self, repo_id: str) -> Path:
        """The hub repository's ADAPTER_FILE, fetched once (from the cache when offline)."""
        if repo_id not in self._hub:
            from huggingface_hub import constants, snapshot_download
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

            offline = constants.HF_HUB_OFFLINE
            try:
                folder = Path(snapshot_download(repo_id, allow_patterns=[ADAPTER_FILE], local_files_only=offline))
            except LocalEntryNotFoundError:
                why = "the hub is offline (HF_HUB_OFFLINE) and it is not cached" if offline else "the hub cannot be reached"
                raise ParameterError(FIELD, f"adapter {repo_id!r} is not in the adapters directory and {why}") from None
            except (HfHubHTTPError, OSError) as exc:
                raise ParameterError(FIELD, f"adapter {repo_id!r}: could not fetch it from the hub "
                                            f"({type(exc).__name__})") from None
            if not (folder / ADAPTER_FILE).is_file():
                raise ParameterError(FIELD, f"hub repository {repo_id!r} has no {ADAPTER_FILE}")
            self._hub[repo_id] = folder
        return self._hub[repo_id]

    def check(self, name: str) -> str:
        """`name` if it names an adapter this deployment serves (or is NO_LORA); ParameterError otherwise."""
        if name != NO_LORA:
            self.folder(name)
        return name


def resolver_from_parameters(params: Mapping[str, str]) -> AdapterResolver:
    """The resolver of a Triton model: its ADAPTERS_* parameters, or a refusal naming its ENGINE when the
    profile serves no adapters (ONNX graphs and TensorRT plans hold the base weights only)."""
    engine = params.get("ENGINE", "pytorch")
    if engine != "pytorch":
        return AdapterResolver(None, f"LoRA adapters are not served by the {engine} engine (its graphs hold "
                                     f"the base weights only); use {NO_LORA!r} or a pytorch profile (cpu, gpu)")
    return AdapterResolver(AdapterSettings.from_parameters(params) if "ADAPTERS_DIR" in params else None)


@dataclass(frozen=True)
class AdapterChoice:
    """One request's adapter (a name AdapterResolver checked, or NO_LORA) and its weight."""

    name: str = NO_LORA
    weight: float = 1.0

    @classmethod
    def from_arrays(cls, names: np.ndarray, weights: np.ndarray) -> AdapterChoice:
        """From ADAPTER / ADAPTER_WEIGHT [K, 1] rows of one request (preprocess's: all rows alike)."""
        decoded, values = decode_names(names), np.asarray(weights, dtype=np.float32).reshape(-1)
        if not decoded or len(set(decoded)) != 1 or len(values) != len(decoded) or len(set(values.tolist())) != 1:
            raise ParameterError(ADAPTER, f"expected one adapter and weight for all rows, got {decoded} {values.tolist()}")
        return cls(decoded[0], float(values[0]))

    @property
    def key(self) -> str:
        """What the request's conditions depend on (condition_cache.ConditionKey's adapter field): the
        name and weight, or NO_LORA for the base model, whatever its weight."""
        return NO_LORA if self.name == NO_LORA else f"{self.name}@{self.weight!r}"

    def arrays(self, rows: int) -> dict[str, np.ndarray]:
        """ADAPTER / ADAPTER_WEIGHT for `rows` rows of this request (adapter_arrays)."""
        return adapter_arrays(self.name, self.weight, rows)


def adapter_arrays(name: str, weight: float, rows: int) -> dict[str, np.ndarray]:
    """ADAPTER [rows, 1] (BYTES) and ADAPTER_WEIGHT [rows, 1] (float32): one adapter for every row."""
    return {ADAPTER: np.full((rows, 1), name.encode(), dtype=np.object_),
            ADAPTER_WEIGHT: np.full((rows, 1), weight, dtype=np.float32)}


def decode_names(array: np.ndarray) -> list[str]:
    """ADAPTER [N, 1] BYTES -> N names."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
