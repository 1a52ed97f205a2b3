"""Engines run a component's spec on a batch of named tensors: PyTorch here, ONNX Runtime beside it.

Both take and return {tensor name: torch.Tensor}, so a Triton python model (and the in-process
pipeline) does not care which one runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import load_components
from acestep_triton.registry import component_spec
from acestep_triton.specs import ComponentSpec


class TorchEngine:
    """The component module from acestep_triton.components on a device and dtype."""

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.spec, self.module, self.device, self.dtype = spec, module, device, dtype

    @classmethod
    def load(cls, name: str, ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32,
             accelerate: bool = False, low_vram: bool = False) -> TorchEngine:
        return load_engines([name], ckpt, device, dtype, accelerate, low_vram)[name]

    @torch.inference_mode()
    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = []
        for t in self.spec.inputs:
            value = batch[t.name].to(self.device, non_blocking=True)
            args.append(value.to(self.dtype) if value.is_floating_point() else value)
        outputs = self.module(*args)
        return {t.name: out.float() for t, out in zip(self.spec.outputs, outputs)}


def load_engines(names: Sequence[str], ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accelerate: bool = False, low_vram: bool = False) -> dict[str, TorchEngine]:
    """Engines for `names`, loaded together (the transformer components share one transformer).

    `accelerate` applies the gpu profile's speed-ups (acestep_triton.acceleration), `low_vram` the
    lowvram profile's memory settings (acestep_triton.low_vram); both warm up what they set, so
    the first request does not pay for compilation.
    """
    if accelerate and low_vram:
        raise ValueError("accelerate and low_vram are two profiles' settings: choose one")
    modules = load_components(names, ckpt, device, dtype)
    engines = {name: TorchEngine(component_spec(name, ckpt), module, torch.device(device), dtype)
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
