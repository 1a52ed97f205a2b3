"""LoRA adapters on the ACE-Step transformer, applied per batch row: the math and the resident set.

Format (what upstream's `ACEStepPipeline.load_lora` reads, diffusers/peft without adapter names): a
folder holding adapters.ADAPTER_FILE with `<module path>.lora_A.weight` [r, in] and
`<module path>.lora_B.weight` [out, r] for Linear layers of the transformer. There is no alpha, so
upstream's scale is exactly the request's lora_weight, and an adapted layer computes

    W x + b + lora_weight * B(A(x))

the base output first and the LoRA term added to it, as peft does. The layers adapted are
TARGET_MODULES (upstream's published target list): self- and cross-attention `to_q/to_k/to_v/to_out.0`
of every block, the lyric Conformer's `linear_q/k/v/out` and `feed_forward.w_1/w_2`, and
`speaker_embedder`. An adapter with weights for any other module is refused, naming it.

Per row. A batch may hold rows of several requests (dynamic batching in condition_encoder and
dit_step), each with its own adapter and weight, or none. `LoraLayers` puts a forward hook on every
target layer; while `AdapterStore.applied` runs a batch, each hook adds, for every adapter in the
batch, `weight_row * B(A(x_row))` to that adapter's rows only: the term is computed on each run of
consecutive rows using the adapter (a request's rows are consecutive in a batch) and added to those
rows of the layer's output in place, so no other row's output is touched at all. A batch with no
adapter rows runs the base model (the hooks return at once).

Why not peft: peft replaces each Linear by a wrapper with one set of active adapters per forward. Its
mixed-batch mode (`adapter_names=` per row) gives each adapter one scale, so two requests using the
same adapter at different weights could not share a batch; it maps rows through the top-level
forward's first axis, while our attention flattens [B, L, C] to [B*L, C] rows before the projections;
and wrapping modules changes the modules the gpu profile compiles. The math here is the same two
matrix products peft computes (checked against upstream's output on the golden cases l1/l2).

Upstream keeps one adapter loaded and remembers its (path, weight) even after unloading it for a
"none" request, so the same LoRA request right after skips loading and runs the base model (golden
case l3). That is a bug; here every request gets the adapter it names (l3 = l1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from acestep_triton.adapters import ADAPTER_FILE, FIELD, AdapterResolver, AdapterSettings, decode_names
from acestep_triton.contract import NO_LORA, ParameterError
from acestep_triton.specs import ADAPTER, ADAPTER_ID, ADAPTER_WEIGHT

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "linear_q", "linear_k", "linear_v", "linear_out",
                  "w_1", "w_2", "speaker_embedder")
DOWN, UP = ".lora_A.weight", ".lora_B.weight"

# module path -> (down A [r, in], up B [out, r])
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def target_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's Linear layers an adapter may change, by module path (pruned parts have none)."""
    return {path: module for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(path == t or path.endswith("." + t) for t in TARGET_MODULES)}


def read_factors(name: str, folder: Path, shapes: Mapping[str, tuple[int, int]]) -> Factors:
    """The adapter's factors on the CPU, checked against `shapes` ({target path: (out, in)} of the full
    model); ParameterError on lora_name_or_path naming what does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(folder / ADAPTER_FILE)
    except (SafetensorError, OSError) as exc:
        raise ParameterError(FIELD, f"adapter {name!r}: {ADAPTER_FILE} is not readable ({exc})") from None
    paths = {}
    for key in tensors:
        if not key.endswith((DOWN, UP)):
            raise ParameterError(FIELD, f"adapter {name!r}: {key!r} is not a LoRA weight of the diffusers/peft "
                                        f"format (<module>{DOWN}, <module>{UP})")
        paths.setdefault(key.removesuffix(DOWN).removesuffix(UP), None)
    factors: Factors = {}
    for path in paths:
        if path not in shapes:
            raise ParameterError(FIELD, f"adapter {name!r} changes {path!r}, which is not one of the layers "
                                        f"adapted here ({', '.join(TARGET_MODULES)})")
        down, up = tensors.get(path + DOWN), tensors.get(path + UP)
        out_features, in_features = shapes[path]
        if down is None or up is None:
            raise ParameterError(FIELD, f"adapter {name!r}: {path!r} lacks {DOWN if down is None else UP}")
        if (down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]
                or down.shape[1] != in_features or up.shape[0] != out_features):
            raise ParameterError(FIELD, f"adapter {name!r}: {path!r} has A {list(down.shape)} and B "
                                        f"{list(up.shape)}, the layer is {in_features} -> {out_features}")
        factors[path] = (down, up)
    return factors


class RowAdapters:
    """Which adapter each row of the running batch uses: ids [N] (0 = the base model), weights [N]
    (float32, on the model's device), and the factors of the ids present. `runs` are the runs of
    consecutive rows with one adapter (a request's rows are consecutive in a batch)."""

    def __init__(self, ids: Sequence[int], weights: torch.Tensor, factors: Mapping[int, Factors]) -> None:
        self.ids, self.weights, self.factors = tuple(ids), weights, factors
        self.runs: list[tuple[int, int, Factors]] = []
        start = 0
        for row in range(1, len(self.ids) + 1):
            if row == len(self.ids) or self.ids[row] != self.ids[start]:
                if self.ids[start]:
                    self.runs.append((start, row, factors[self.ids[start]]))
                start = row

    def adapted_rows(self) -> list[int]:
        """The rows that use an adapter."""
        return [row for row, adapter_id in enumerate(self.ids) if adapter_id]

    def subset(self, rows: Sequence[int]) -> RowAdapters:
        """The same rows' adapters for a batch made of `rows` only (in that order)."""
        return RowAdapters([self.ids[r] for r in rows], self.weights[list(rows)], self.factors)


class LoraLayers:
    """Forward hooks on a model's target layers that add the LoRA terms of the rows in `active`.

    `active` is set for the duration of one batch (AdapterStore.applied); the hooks map their input's
    rows to batch rows by its row count: an input [B, ..., in] or its rows flattened to [B*L, in]
    (the attention projections) both hold batch row b in their b-th block.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = target_layers(model)
        self.active: RowAdapters | None = None
        for path, layer in self.layers.items():
            layer.register_forward_hook(self._hook(path))

    def _hook(self, path: str):
        def add_terms(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.active is None:
                return None
            return self.add_terms(path, args[0], output)

        return add_terms

    def add_terms(self, path: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` (the layer's base output for input x, a fresh tensor) with each adapted row's term
        added in place."""
        batch = len(self.active.ids)
        rows_in, rows_out = x.unflatten(0, (batch, -1)), output.unflatten(0, (batch, -1))
        for start, stop, factors in self.active.runs:
            if path not in factors:
                continue
            down, up = factors[path]
            term = F.linear(F.linear(rows_in[start:stop], down), up)
            weights = self.active.weights[start:stop].view(-1, *([1] * (term.dim() - 1)))
            rows_out[start:stop] += (term * weights).to(output.dtype)
        return output


class AdapterStore:
    """The adapters one model process serves: names -> ids, loading, the least recently used unloaded.

    Ids are process-local and stable (0 = the base model), so batch rows carry them as a tensor
    (specs.ADAPTER_ROWS). Loading validates the whole adapter against the full model (a model
    pruned to some parts, registry `parts`, keeps only the factors of the layers it has), so every
    process refuses a bad adapter the same way. Adapters are loaded on first use and kept up to
    `settings.max_resident`, the least recently used unloaded beyond; a running batch holds its
    adapters' factors itself, so one that needs more adapters than that still runs.
    """

    def __init__(self, model: nn.Module, settings: AdapterSettings, device: torch.device, dtype: torch.dtype) -> None:
        self.resolver = AdapterResolver(settings)
        self.max_resident = settings.max_resident
        self.device, self.dtype = device, dtype
        self.layers = LoraLayers(model)
        with torch.device("meta"):
            full = type(model).from_config(model.config)
        self.shapes = {path: (layer.out_features, layer.in_features) for path, layer in target_layers(full).items()}
        self._ids: dict[str, int] = {NO_LORA: 0}
        self._names: list[str] = [NO_LORA]
        self._resident: OrderedDict[int, Factors] = OrderedDict()

    @property
    def resident(self) -> tuple[str, ...]:
        """Names of the loaded adapters, least recently used first."""
        return tuple(self._names[i] for i in self._resident)

    @property
    def active(self) -> RowAdapters | None:
        """The adapters of the running batch's rows, when any row has one."""
        return self.layers.active

    def adapter_id(self, name: str) -> int:
        """The id of adapter `name`, loading it if needed (ParameterError for a name or file that does not fit)."""
        if name not in self._ids:
            self.resolver.check(name)
            self._ids[name] = len(self._names)
            self._names.append(name)
        adapter_id = self._ids[name]
        if adapter_id:
            self._load(adapter_id)
        return adapter_id

    def request_rows(self, names: Sequence[str], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """specs.ADAPTER_ROWS for rows using adapters `names` at `weights` ([N] or [N, 1])."""
        ids = torch.tensor([self.adapter_id(name) for name in names], dtype=torch.int64)
        weights = weights.reshape(-1).float().cpu()
        if weights.shape[0] != ids.shape[0]:
            raise ParameterError(ADAPTER_WEIGHT, f"{weights.shape[0]} weights for {ids.shape[0]} adapter rows")
        return {ADAPTER_ID: ids, ADAPTER_WEIGHT: weights}

    def wire_rows(self, names: np.ndarray | None, weights: torch.Tensor | np.ndarray | None,
                  rows: int) -> dict[str, torch.Tensor]:
        """specs.ADAPTER_ROWS of a request's `rows` rows from its optional ADAPTER [rows, 1] (BYTES) and
        ADAPTER_WEIGHT [rows, 1] (the wire form, specs.ADAPTER_INPUTS), loading the adapters now so that
        one that does not fit fails its own request only; the base model for every row when both are
        absent (a client that sends none)."""
        if (names is None) != (weights is None):
            raise ParameterError(ADAPTER, f"{ADAPTER} and {ADAPTER_WEIGHT} come together")
        if names is None:
            return self.request_rows([NO_LORA] * rows, torch.ones(rows))
        decoded = decode_names(names)
        if len(decoded) != rows:
            raise ParameterError(ADAPTER, f"{len(decoded)} adapter rows for a batch of {rows}")
        return self.request_rows(decoded, torch.as_tensor(weights))

    def _load(self, adapter_id: int) -> Factors:
        if adapter_id in self._resident:
            self._resident.move_to_end(adapter_id)
            return self._resident[adapter_id]
        name = self._names[adapter_id]
        factors = read_factors(name, self.resolver.folder(name), self.shapes)
        self._resident[adapter_id] = {
            path: (down.to(self.device, self.dtype), up.to(self.device, self.dtype))
            for path, (down, up) in factors.items() if path in self.layers.layers
        }
        while len(self._resident) > self.max_resident:
            self._resident.popitem(last=False)
        return self._resident[adapter_id]

    @contextmanager
    def applied(self, ids: torch.Tensor, weights: torch.Tensor) -> Iterator[None]:
        """Run the model inside this block with row i using adapter ids[i] at weights[i] ([N] each)."""
        ids_list = ids.reshape(-1).tolist()
        used = set(ids_list) - {0}
        if not used:
            yield
            return
        weights = weights.reshape(-1).float().to(self.device)
        with self._active(RowAdapters(ids_list, weights, {i: self._load(i) for i in used})):
            yield

    @contextmanager
    def only(self, rows: Sequence[int]) -> Iterator[None]:
        """Inside an `applied` block: run a batch made of these of its rows (the gpu profile decodes
        the rows with and without adapters apart)."""
        subset = self.layers.active.subset(rows)
        with self._active(subset if subset.runs else None):
            yield

    @contextmanager
    def _active(self, rows: RowAdapters | None) -> Iterator[None]:
        previous, self.layers.active = self.layers.active, rows
        try:
            yield
        finally:
            self.layers.active = previous


def adapter_rows(store: AdapterStore | None, name: str, weight: float) -> Callable[[int], dict[str, torch.Tensor]]:
    """For callers that run the engines themselves (the in-process pipeline): rows -> the
    specs.ADAPTER_ROWS of that many rows of one request using adapter `name` at `weight`, nothing for
    the base model. The name is checked and the adapter loaded here, before anything runs."""
    if name == NO_LORA:
        return lambda rows: {}
    if store is None:
        AdapterResolver(None).check(name)  # raises: no adapters served
    store.adapter_id(name)
    return lambda rows: store.request_rows([name] * rows, torch.full((rows,), weight))
