"""The `gpu` profile's speed-ups, applied to loaded CUDA engines without changing what they compute.

- dit_step: every transformer block is compiled once with torch.compile (regional compilation:
  the blocks share the generated kernels, shapes are dynamic, so the pointwise work around the
  matmuls runs fused), and the whole decode is replayed from CUDA graphs, one per
  (row bucket, frame bucket, token bucket). Frames and tokens are zero-padded up to their bucket
  with their masks zeroed, which the decode already treats as absent (the padded-batch test holds
  it to that); rows are padded with copies of the first. A graph serves every length and batch in
  its buckets, and a step costs one launch.
- vocoder: mels are decoded in fixed windows (ADaMoSHiFiGAN.decode_windowed, equal to a whole
  decode up to rounding), each window replayed from one CUDA graph: any length, bounded memory,
  one set of cuDNN algorithms.
- vocoder head in channels-last layout (HiFiGANHead.channels_last): cuDNN convolves NHWC data
  directly instead of transposing around every convolution.
- cuDNN benchmark mode picks the fastest convolution algorithms for the shapes it sees; float32
  matrix products (only the linear attention's) use TF32, as upstream's GPU pipeline sets.

`accelerate_engine` applies what every component shares, then the component's own hook (its
registry `acceleration`: `accelerate_dit_step`, `accelerate_vocoder`), which also warms it up, so
compilation and capture happen at load.
Run the process with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set before CUDA starts):
without it the caching allocator's fragmentation reserves ~40 % more than is allocated at 240 s.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from acestep_triton.registry import component, resolve


class TorchEngine(Protocol):
    """What the speed-ups use of acestep_triton.engines.TorchEngine; a Protocol so that this module
    does not import engines, which loads it (no import cycle)."""

    device: torch.device
    module: torch.nn.Module

    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Acceleration:
    """Which speed-ups `accelerate_engine` applies (all on for the gpu profile)."""

    compile_blocks: bool = True
    decode_graphs: bool = True
    frame_bucket: int = 16  # latent frames (~0.19 s of audio)
    token_bucket: int = 32  # condition tokens
    # batch rows (guidance branches x requests) are padded up to one of these, repeating the first row
    row_buckets: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    max_graphs: int = 24
    # mel frames (~23.8 s of audio); None decodes whole. Windows keep one shape, so cuDNN's algorithm
    # search (seconds to a minute for a new length) runs once at warm-up; the overlap costs 9-19 %.
    vocoder_window_frames: int | None = 2048
    vocoder_graphs: bool = True
    vocoder_channels_last: bool = True
    cudnn_benchmark: bool = True
    tf32_matmul: bool = True


class CudaGraphs:
    """Calls fn(*tensors) -> tensor through CUDA graphs captured once per input shapes and dtypes.

    Inputs are copied into the graph's static tensors and the output is cloned out of it, so a
    result stays valid after the next replay. Graphs share one memory pool, which is safe because
    they are replayed one at a time on one stream; the least recently used one is dropped beyond
    `max_graphs`. Call under torch.inference_mode (TorchEngine.run does).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 8, warmup_runs: int = 2) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.pool = None
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = (
            OrderedDict()
        )

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            self._capture(key, tensors)
        graph, static_inputs, static_output = self.graphs[key]
        for static, value in zip(static_inputs, tensors):
            static.copy_(value)
        graph.replay()
        return static_output.clone()

    def _capture(self, key: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static_inputs = tuple(t.clone() for t in tensors)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles, autotunes and allocates outside the capture
            for _ in range(self.warmup_runs):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_output = self.fn(*static_inputs)
        self.graphs[key] = (graph, static_inputs, static_output)


class BucketedDecode:
    """`transformer.decode` with frames and condition tokens zero-padded up to bucket multiples
    (masks zeroed there) and rows padded up to a row bucket (copies of the first row), run through
    CudaGraphs; returns the velocity of the real rows and frames only. Buckets bound the number of
    graphs a server needs whatever lengths and batch sizes its requests bring."""

    def __init__(self, decode: Callable[..., torch.Tensor], settings: Acceleration) -> None:
        self.frame_bucket = settings.frame_bucket
        self.token_bucket = settings.token_bucket
        self.row_buckets = settings.row_buckets
        self.run = CudaGraphs(decode, settings.max_graphs) if settings.decode_graphs else decode

    def __call__(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale) -> torch.Tensor:
        rows, frames, tokens = latents.shape[0], latents.shape[-1], encoder_states.shape[1]
        frame_pad, token_pad = -frames % self.frame_bucket, -tokens % self.token_bucket
        if frame_pad:
            latents = F.pad(latents, (0, frame_pad))
            attention_mask = F.pad(attention_mask, (0, frame_pad))
        if token_pad:
            encoder_states = F.pad(encoder_states, (0, 0, 0, token_pad))
            encoder_mask = F.pad(encoder_mask, (0, token_pad))
        inputs = (latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale)
        row_pad = next((b for b in self.row_buckets if b >= rows), rows) - rows
        if row_pad:
            inputs = tuple(torch.cat([t, t[:1].expand(row_pad, *t.shape[1:])]) for t in inputs)
        return self.run(*inputs)[:rows, ..., :frames]


def compile_blocks(transformer: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (dynamic shapes; the blocks share kernels).

    Graph variants: one or several rows x with or without the ERG query scale.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for block in transformer.transformer_blocks:
        block.compile(dynamic=True)


def _dit_warmup_batch(engine: TorchEngine, rows: int, frames: int, tokens: int) -> dict[str, torch.Tensor]:
    config = engine.module.transformer.config
    return {
        "LATENTS": torch.randn(rows, config.in_channels, config.max_height, frames),
        "ATTENTION_MASK": torch.ones(rows, frames),
        "ENCODER_STATES": torch.randn(rows, tokens, config.inner_dim),
        "ENCODER_MASK": torch.ones(rows, tokens),
        "TIMESTEP": torch.full((rows, 1), 500.0),
        "Q_SCALE": torch.ones(rows, 1),
    }


def accelerate_engine(name: str, engine: TorchEngine, settings: Acceleration = Acceleration()) -> None:
    """Apply `settings` to a loaded CUDA engine in place and warm it up (the component's registry hook)."""
    if engine.device.type != "cuda":
        raise ValueError(f"accelerate: the gpu speed-ups need a CUDA device, got {engine.device}")
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32_matmul
    hook = component(name).acceleration
    if hook:
        resolve(hook)(engine, settings)
    torch.cuda.synchronize(engine.device)


def accelerate_dit_step(engine: TorchEngine, settings: Acceleration) -> None:
    """dit_step's hook: compiled blocks, bucketed CUDA-graph decodes, warmed up at two row counts."""
    module = engine.module
    if settings.compile_blocks:
        compile_blocks(module.transformer)
    module.decode = BucketedDecode(module.transformer.decode, settings)
    # different frame and token counts, so dynamic shapes do not tie the two together
    for rows in (1, 2):
        engine.run(_dit_warmup_batch(engine, rows, 5 * settings.frame_bucket, 3 * settings.token_bucket))


def accelerate_vocoder(engine: TorchEngine, settings: Acceleration) -> None:
    """vocoder's hook: channels-last head, windowed decode replayed from a CUDA graph, warmed up."""
    module = engine.module
    module.vocoder.head.channels_last = settings.vocoder_channels_last
    module.window_frames = settings.vocoder_window_frames
    if settings.vocoder_window_frames is not None:
        if settings.vocoder_graphs:
            module.decode_window = CudaGraphs(module.vocoder.decode, max_graphs=2)
        n_mels = module.vocoder.config.n_mels
        engine.run({"MEL": torch.randn(1, 2, n_mels, 2 * settings.vocoder_window_frames) - 5.0})
