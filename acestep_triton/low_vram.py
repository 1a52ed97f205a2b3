"""The `lowvram` profile's memory settings (the spec's "CPU offload"), applied to loaded engines.

The profile (export.build_repository) keeps the GPU memory of all server processes together
under 8 GiB for a 240 s request: only dit_step and the two decoders touch CUDA (each process with a
CUDA context costs ~0.5 GiB; the three encoders, dcae_encoder included, run on the CPU); the
decoders' weights wait in pinned host memory between executions (`HostWeights`) and every GPU
component hands its allocator cache back after each execution, so at any time the GPU holds
dit_step's weights (4.6 GiB in bf16), the prepared cross-attention keys/values its condition cache
keeps for the requests in their steps, and the working memory of one stage.
benchmarks/NOTES.md ("Low VRAM") has the budget per process.

What each component's registry hook (`low_vram`) does to its engine here:
- dit_step: its transformer blocks compiled (CUDA only: torch.compile's kernels need the GPU; on the
  CPU, where the tests run this profile, they stay eager). No CUDA graphs: their memory pool and the
  conditions they hold would stay allocated between requests.
- dcae_decoder: the global part chunk by chunk and the local part in windows, one at a time
  (dcae.latents_to_mel_windowed), eager: its weights move between executions, which a CUDA graph,
  replaying fixed addresses, cannot follow. ~0.4 GiB of working memory at 240 s instead of 4.2 GiB
  whole (3.3 GiB with only the local part windowed).
- vocoder: windows one at a time with the channels-last head and cuDNN benchmark mode (one window
  shape, searched once here at load), eager for the same reason.
Each hook ends with a warm-up run, so a first request does not pay for compilation or search.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from acestep_triton.registry import component, resolve
from acestep_triton.sampling.seeds import latent_frames


class TorchEngine(Protocol):
    """What the hooks use of acestep_triton.engines.TorchEngine (a Protocol: engines imports this module)."""

    device: torch.device
    module: torch.nn.Module
    spec: object

    def run(self, batch): ...


@dataclass(frozen=True)
class LowVram:
    """The sizes the hooks use; working memory at 240 s in bf16 from benchmarks/NOTES.md."""

    # latent frames per DCAE window (local part) and per chunk of its global part: ~0.42 GiB at 240 s
    # (232 frames: ~0.54 GiB); windows overlap by 8 frames on each side, ~14 % more local work
    dcae_window_frames: int = 128
    dcae_chunk_frames: int = 128
    # mel frames per vocoder window (~23.8 s), one window per call: ~0.34 GiB at 240 s, most of it the
    # whole waveform
    vocoder_window_frames: int = 2048
    # a warm-up request's length: the windows and chunks above are then all exercised at load
    warm_seconds: float = 30.0


def prepare_engine(name: str, engine: TorchEngine, settings: LowVram = LowVram()) -> None:
    """Apply component `name`'s low-VRAM hook (registry `low_vram`) to a loaded engine and warm it up."""
    hook = component(name).low_vram
    if hook:
        resolve(hook)(engine, settings)


def prepare_dit_step(engine: TorchEngine, settings: LowVram) -> None:
    """dit_step: compiled transformer blocks on CUDA (as the gpu profile's, without its CUDA graphs);
    warmed up at one and two rows, so that compilation happens at load."""
    from acestep_triton.acceleration import _dit_warmup_batch, compile_blocks

    if engine.device.type == "cuda":
        compile_blocks(engine.module.transformer)
    for rows in (1, 2):
        engine.run(_dit_warmup_batch(engine, rows, latent_frames(settings.warm_seconds), 64))


def prepare_dcae_decoder(engine: TorchEngine, settings: LowVram) -> None:
    """dcae_decoder: global part in chunks, local part in windows one at a time; no cuDNN benchmark
    search (every new length would trigger one; the DCAE runs < 2 % slower without it)."""
    from acestep_triton.acceleration import _without_cudnn_search

    module = engine.module
    module.window_frames = settings.dcae_window_frames
    module.window_batch = 1
    module.global_chunk_frames = settings.dcae_chunk_frames
    module.forward = _without_cudnn_search(module.forward)
    channels, height, _ = engine.spec.inputs[0].dims
    engine.run({"LATENTS": torch.randn(1, channels, height, latent_frames(settings.warm_seconds))})


def prepare_vocoder(engine: TorchEngine, settings: LowVram) -> None:
    """vocoder: windows one at a time, channels-last head, cuDNN benchmark mode for the one window
    shape (its heuristics pick algorithms up to 30x slower: benchmarks/RESULTS.md)."""
    module = engine.module
    module.vocoder.head.channels_last = True
    module.window_frames = settings.vocoder_window_frames
    module.window_batch = 1
    torch.backends.cudnn.benchmark = True
    n_mels = module.vocoder.config.n_mels
    engine.run({"MEL": torch.randn(1, 2, n_mels, 2 * settings.vocoder_window_frames) - 5.0})


class HostWeights:
    """A module's parameters and buffers kept in host memory (pinned for CUDA) between executions and
    copied to `device` for one: `with weights: module(...)`.

    Moving them swaps each tensor's `.data`, so the module object, its hooks and the references to
    its parameters stay as they are; on exit the device copies are dropped and the allocator's cache
    is handed back. A copy costs ~5-15 ms per 100 M bf16 parameters from pinned memory, against a
    decode of 0.1-0.5 s at 240 s. Tensors shared by several submodules are moved once.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str) -> None:
        self.device = torch.device(device)
        found = {id(t): t for t in (*module.parameters(), *module.buffers())}
        self.tensors = list(found.values())
        pin = self.device.type == "cuda"
        self.host = [torch.empty_like(t, device="cpu", pin_memory=pin).copy_(t.detach()) for t in self.tensors]
        self._offload()

    def __enter__(self) -> HostWeights:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = torch.empty_like(host, device=self.device).copy_(host, non_blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._offload()

    def _offload(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host
        release_cache(self.device)


class ExecutionMemory:
    """What a GPU component of the lowvram profile does around each execution (`with memory.turn():`):
    take the repository's GPU lock, copy its weights in (`HostWeights`), run, drop them and hand the
    allocator's cache back; each part only when its config parameter asks for it."""

    def __init__(self, weights: HostWeights | None, release: torch.device | None, lock: str | None) -> None:
        self.weights, self.release, self.lock = weights, release, lock
        if release is not None:  # what the load and the hook's warm-up left cached, before any request
            release_cache(release)

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], engine: TorchEngine, repository: Path) -> ExecutionMemory:
        """From a model's config parameters (OFFLOAD_WEIGHTS, RELEASE_CACHE, GPU_LOCK set to "1" by
        export.build_repository for the lowvram profile's pytorch engines) and its model repository
        (naming the lock)."""
        weights = HostWeights(engine.module, engine.device) if params.get("OFFLOAD_WEIGHTS") == "1" else None
        release = engine.device if params.get("RELEASE_CACHE") == "1" else None
        lock = gpu_lock_path(repository) if params.get("GPU_LOCK") == "1" else None
        return cls(weights, release, lock)

    @contextmanager
    def turn(self) -> Iterator[None]:
        with exclusive(self.lock) if self.lock else nullcontext():
            with self.weights if self.weights is not None else nullcontext():
                yield
            if self.release is not None:
                release_cache(self.release)


def release_cache(device: torch.device) -> None:
    """Hand the CUDA caching allocator's unused memory back to the driver (NVML then stops counting
    it); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_lock_path(repository: str | os.PathLike) -> str:
    """The lock file the GPU components of one model repository share (in the temp directory, named
    after the repository's real path, so that two servers of other repositories do not share it)."""
    digest = hashlib.sha256(os.path.realpath(repository).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"acestep-gpu-{digest}.lock")


@contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) while inside: one execution at a time
    over every process of the repository, so the working memory of two stages is never on the GPU
    together (requests pipelined through the ensemble would otherwise decode one while another
    runs its steps)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
