"""The lowvram profile's GPU memory per server process, estimated on the CPU (no GPU, no weights).

    python -m benchmarks.lowvram_estimate [--context-mib 600] [--server-mib 400]

Weights: each GPU component's parameters and buffers as its process keeps them (the registry's
parts, the projections no forward applies dropped), built at full size on the `meta` device, in
bf16. Working memory: the peak of live tensors while the component runs at 240 s (2583 latent
frames) with the lowvram hooks' settings, traced under PyTorch's fake tensors (shapes only) and
eager (torch.compile fuses, so dit_step's real peak is lower); cuDNN and cuBLAS workspaces are not
in it. CUDA context per process: --context-mib, from the H200 (16 CPU-loop processes with a CUDA
context held 8296 MiB more: benchmarks/RESULTS.md) plus the libraries' handles. The stages take
turns on the GPU (the profile's lock), so the budget is the largest sum over stages of: the running
component's peak, the resident weights and every other GPU process's context.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import keep_parts
from acestep_triton.contract import MAX_DURATION_S
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.low_vram import LowVram
from acestep_triton.registry import component, resolve
from export.build_repository import PROFILES
from export.samples import Sizes, sample_inputs

CONFIGS = Path(__file__).resolve().parent / "full_size_configs"
MIB = 2**20


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages created by the operations run inside (existing ones not counted)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.live, self.peak = existing, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref.cdata not in self.existing:
                    self.live.setdefault(ref.cdata, (ref, tensor.untyped_storage().nbytes()))
        self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def load_fake(name: str) -> torch.nn.Module:
    """GPU component `name` (dit_step, dcae_decoder, vocoder) at full size under the current fake mode,
    as its process keeps it: the registry's parts, the transformer without its unapplied projections."""
    from diffusers import AutoencoderDC

    from acestep_triton.models.transformer import ACEStepTransformer, drop_unapplied_projections
    from acestep_triton.models.vocoder import ADaMoSHiFiGAN

    classes = {"dit_step": ACEStepTransformer, "dcae_decoder": AutoencoderDC, "vocoder": ADaMoSHiFiGAN}
    entry = component(name)
    model = classes[name].from_config(classes[name].load_config(CONFIGS / entry.folder))
    if name == "dit_step":
        drop_unapplied_projections(model)
    if entry.parts:
        keep_parts(model, [name])
    return resolve(entry.module)(model).eval()


def estimate(name: str, settings: LowVram) -> dict:
    """{'weights_mib', 'working_mib'} of component `name` at 240 s (batch: one item, or one 240 s row)."""
    torch.set_default_dtype(torch.bfloat16)
    with FakeTensorMode(), torch.no_grad():
        module = load_fake(name)
        weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        if name == "dcae_decoder":
            module.window_frames, module.window_batch = settings.dcae_window_frames, 1
            module.global_chunk_frames = settings.dcae_chunk_frames
        if name == "vocoder":
            module.window_frames, module.window_batch = settings.vocoder_window_frames, 1
        frames = PUBLISHED_GEOMETRY.frames(MAX_DURATION_S)
        sizes = Sizes(batch=1, text_tokens=64, lyric_tokens=512, latent_frames=frames)
        inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t
                  for t in sample_inputs(name, Checkpoint(CONFIGS), sizes, device="meta").values()]
        inputs = [torch.empty(t.shape, dtype=t.dtype) for t in inputs]
        existing = {StorageWeakRef(t.untyped_storage()).cdata for t in (*module.parameters(), *module.buffers())}
        tracker = PeakMemory(existing)
        with tracker:
            module(*inputs)
    torch.set_default_dtype(torch.float32)
    return {"weights_mib": weights / MIB, "working_mib": tracker.peak / MIB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-mib", type=float, default=600.0, help="CUDA context + library handles per process")
    parser.add_argument("--server-mib", type=float, default=400.0,
                        help="tritonserver's own GPU memory: its CUDA context (Triton creates one at start)")
    args = parser.parse_args(argv)
    profile = PROFILES["lowvram"]
    gpu = [n for n in ("dit_step", "dcae_decoder", "vocoder") if n not in profile.cpu_components]
    parts = {name: estimate(name, LowVram()) for name in gpu}
    resident = {n: (p["weights_mib"] if not profile.offloads(n) else 0.0) for n, p in parts.items()}
    stages = {}
    for running in gpu:
        others = sum(args.context_mib + resident[n] for n in gpu if n != running)
        own = args.context_mib + parts[running]["weights_mib"] + parts[running]["working_mib"]
        stages[running] = args.server_mib + others + own
    print(json.dumps({"per_component": parts, "resident_mib": resident, "sum_while_running_mib": stages}, indent=1))
    print(f"largest sum: {max(stages.values()) / 1024:.2f} GiB (while {max(stages, key=stages.get)} runs)")


if __name__ == "__main__":
    main()
