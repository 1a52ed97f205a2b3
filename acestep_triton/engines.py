"""Engines run a component's spec on a batch of named tensors: PyTorch here, ONNX Runtime beside it.

Both take and return {tensor name: torch.Tensor}, so a Triton python model (and the in-process
pipeline) does not care which one runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from acestep_triton.adapters import AdapterSettings
from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import load_components
from acestep_triton.lora import AdapterStore
from acestep_triton.registry import component, component_spec
from acestep_triton.specs import ADAPTER_ID, ADAPTER_WEIGHT, ComponentSpec


class TorchEngine:
    """The component module from acestep_triton.components on a device and dtype.

    `adapters`: the LoRA adapters of the component's transformer (registry `lora`), or None. A batch
    carrying specs.ADAPTER_ROWS then runs each row with its adapter (AdapterStore.applied).
    """

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 adapters: AdapterStore | None = None):
        self.spec, self.module, self.device, self.dtype = spec, module, device, dtype
        self.adapters = adapters

    @classmethod
    def load(cls, name: str, ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32,
             accelerate: bool = False, adapters: AdapterSettings | None = None,
             low_vram: bool = False) -> TorchEngine:
        return load_engines([name], ckpt, device, dtype, accelerate, adapters, low_vram)[name]

    @torch.inference_mode()
    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = []
        for t in self.spec.inputs:
            value = batch[t.name].to(self.device, non_blocking=True)
            args.append(value.to(self.dtype) if value.is_floating_point() else value)
        with self.adapted(batch):
            outputs = self.module(*args)
        return {t.name: out.float() for t, out in zip(self.spec.outputs, outputs)}

    def adapted(self, batch: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]:
        """Inside: the module runs row i of `batch` with the adapter its specs.ADAPTER_ROWS name
        (AdapterStore.applied); the base model for a batch without them."""
        if self.adapters is None or ADAPTER_ID not in batch:
            return nullcontext()
        return self.adapters.applied(batch[ADAPTER_ID], batch[ADAPTER_WEIGHT])


def load_engines(names: Sequence[str], ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accelerate: bool = False, adapters: AdapterSettings | None = None,
                 low_vram: bool = False) -> dict[str, TorchEngine]:
    """Engines for `names`, loaded together (the transformer components share one transformer).

    `accelerate` applies the gpu profile's speed-ups (acestep_triton.acceleration), `low_vram` the
    lowvram profile's memory settings (acestep_triton.low_vram); both warm up what they set, so the
    first request does not pay for compilation. With `adapters`, the components that take LoRA
    adapters (registry `lora`) get one AdapterStore per transformer they share, made before the
    speed-ups and memory hooks so that the compiled blocks trace its hooks once.
    """
    if accelerate and low_vram:
        raise ValueError("accelerate and low_vram are two profiles' settings: choose one")
    modules = load_components(names, ckpt, device, dtype)
    stores: dict[int, AdapterStore] = {}

    def store(name: str) -> AdapterStore | None:
        if adapters is None or not component(name).lora:
            return None
        model = modules[name].transformer
        if id(model) not in stores:
            stores[id(model)] = AdapterStore(model, adapters, torch.device(device), dtype)
        return stores[id(model)]

    engines = {name: TorchEngine(component_spec(name, ckpt), module, torch.device(device), dtype, store(name))
               for name, module in modules.items()}
    if accelerate:
        from acestep_triton.acceleration import accelerate_engine

        for name, engine in engines.items():
            accelerate_engine(name, engine)
    if low_vram:
        from acestep_triton.low_vram import prepare_engine

        for name, engine in engines.items():
            prepare_engine(name, engine)
    return engines
