"""The lowvram profile's GPU memory per server process, estimated on the CPU (no GPU, no weights).

    python -m benchmarks.lowvram_estimate [--context-mib 600] [--server-mib 400]

Weights: each GPU component's parameters and buffers as its process keeps them (the registry's
parts, the projections no forward applies dropped), built at full size on the `meta` device, in
bf16. Working memory: the peak of live tensors while the component runs at 240 s (2583 latent
frames) with the lowvram hooks' settings, traced under PyTorch's fake tensors (shapes only) and
eager (torch.compile fuses, so dit_step's real peak is lower); cuDNN and cuBLAS workspaces are not
in it. dit_step runs as served (acestep_triton.dit_step.DitStep, the profile's condition cache and
row bound): a first step that sends the request's branches (contract defaults) and stores their
prepared cross-attention keys/values, then a step that names them; what the cache then holds
(`held_mib`) stays on the GPU between the request's steps. CUDA context per process:
--context-mib, from the H200 (16 CPU-loop processes with a CUDA context held 8296 MiB more:
benchmarks/RESULTS.md) plus the libraries' handles. The stages take turns on the GPU (the
profile's lock), so the budget is the largest sum over stages of: the running component's peak,
the resident weights and every other GPU process's context. Other requests in their steps keep
their keys/values in dit_step meanwhile, up to the cache's bound: the second sum counts it full.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from acestep_triton.checkpoint import Checkpoint
from acestep_triton.components import keep_parts
from acestep_triton.condition_cache import ConditionCache, ConditionSender
from acestep_triton.contract import MAX_DURATION_S, GenerationParams
from acestep_triton.dit_step import DitStep
from acestep_triton.engines import TorchEngine
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from acestep_triton.low_vram import LowVram
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec, resolve
from acestep_triton.sampling.loop import required_branches
from acestep_triton.specs import CONDITION_RELEASE
from export.build_repository import PROFILES, Profile
from export.samples import Sizes, sample_inputs

CONFIGS = Path(__file__).resolve().parent / "full_size_configs"
MIB = 2**20
# The guidance branches of a 240 s request at contract defaults: dit_step's rows per step.
BRANCHES = required_branches(GenerationParams(prompt="", lyrics="", audio_duration=MAX_DURATION_S))


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


def served_steps(module: torch.nn.Module, inputs: dict[str, torch.Tensor], profile: Profile) -> ConditionCache:
    """dit_step's first two steps of a request as the served model runs them (DitStep, the profile's
    cache and row bound), on `inputs` of one row per branch (BRANCHES); returns the cache, holding the request's
    prepared keys/values."""
    cache = ConditionCache(profile.condition_cache_mib * MIB, profile.condition_cache_ttl_s)
    engine = TorchEngine(component_spec("dit_step", Checkpoint(CONFIGS)), module, torch.device("cpu"), torch.bfloat16)
    step = DitStep(engine, cache, profile.dit_max_row_frames)
    keys = ConditionSender("estimate").row_keys(BRANCHES, 1)
    first = {**inputs, "CONDITION_KEY": keys, CONDITION_RELEASE: np.zeros((len(BRANCHES), 1), dtype=bool)}
    later = {name: value for name, value in first.items() if name not in ("ENCODER_STATES", "ENCODER_MASK")}
    for request in (first, later):
        result = step.execute([request])[0]
        if isinstance(result, Exception):
            raise result
    return cache


def estimate(name: str, settings: LowVram, profile: Profile) -> dict:
    """{'weights_mib', 'working_mib', 'held_mib'} of component `name` at 240 s: one item through a
    decoder; dit_step's two steps of one request (`served_steps`), whose cache `held_mib` stays."""
    torch.set_default_dtype(torch.bfloat16)
    held = 0
    with FakeTensorMode(), torch.no_grad():
        module = load_fake(name)
        weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        if name == "dcae_decoder":
            module.window_frames, module.window_batch = settings.dcae_window_frames, 1
            module.global_chunk_frames = settings.dcae_chunk_frames
        if name == "vocoder":
            module.window_frames, module.window_batch = settings.vocoder_window_frames, 1
        rows = len(BRANCHES) if name == "dit_step" else 1
        frames = PUBLISHED_GEOMETRY.frames(MAX_DURATION_S)
        sizes = Sizes(batch=rows, text_tokens=64, lyric_tokens=512, latent_frames=frames)
        inputs = {key: torch.empty(t.shape, dtype=torch.bfloat16 if t.is_floating_point() else t.dtype)
                  for key, t in sample_inputs(name, Checkpoint(CONFIGS), sizes, device="meta").items()}
        existing = {StorageWeakRef(t.untyped_storage()).cdata for t in (*module.parameters(), *module.buffers())}
        tracker = PeakMemory(existing)
        with tracker:
            if name == "dit_step":
                held = served_steps(module, inputs, profile).nbytes
            else:
                module(*inputs.values())
    torch.set_default_dtype(torch.float32)
    return {"weights_mib": weights / MIB, "working_mib": tracker.peak / MIB, "held_mib": held / MIB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-mib", type=float, default=600.0, help="CUDA context + library handles per process")
    parser.add_argument("--server-mib", type=float, default=400.0,
                        help="tritonserver's own GPU memory: its CUDA context (Triton creates one at start)")
    args = parser.parse_args(argv)
    profile = PROFILES["lowvram"]
    gpu = [n for n in NEURAL_COMPONENTS if n not in profile.cpu_components]
    parts = {name: estimate(name, LowVram(), profile) for name in gpu}
    resident = {n: (p["weights_mib"] if not profile.offloads(n) else 0.0) for n, p in parts.items()}
    stages, cache_full = {}, {}
    for running in gpu:
        others = sum(args.context_mib + resident[n] for n in gpu if n != running)
        own = args.context_mib + parts[running]["weights_mib"] + parts[running]["working_mib"]
        stages[running] = args.server_mib + others + own
        cache_full[running] = stages[running] - parts[running]["held_mib"] + profile.condition_cache_mib
    print(json.dumps({"gpu_components": gpu, "per_component": parts, "resident_mib": resident,
                      "sum_while_running_mib": stages, "with_the_condition_cache_full_mib": cache_full}, indent=1))
    print(f"largest sum: {max(stages.values()) / 1024:.2f} GiB (while {max(stages, key=stages.get)} runs); "
          f"with dit_step's condition cache full ({profile.condition_cache_mib} MiB: other requests in their "
          f"steps): {max(cache_full.values()) / 1024:.2f} GiB (while {max(cache_full, key=cache_full.get)} runs)")

if __name__ == "__main__":
    main()
