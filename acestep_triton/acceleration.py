"""The `gpu` profile's speed-ups, applied to loaded CUDA engines without changing what they compute.

- dit_step: every transformer block is compiled once with torch.compile (regional compilation:
  the blocks share the generated kernels, shapes are dynamic, so the pointwise work around the
  matmuls runs fused), and the whole decode is replayed from CUDA graphs, one per
  (row bucket, frame bucket, token bucket). Frames and tokens are zero-padded up to their bucket
  with their masks zeroed, which the decode already treats as absent (the padded-batch test holds
  it to that); rows are padded with copies of the first. A graph serves every length and batch in
  its buckets, and a step costs one launch. Rows with a LoRA adapter (acestep_triton.lora) are
  decoded eagerly, outside the graphs; the other rows of their batch still replay them (BucketedDecode).
- vocoder: mels are decoded in fixed windows (ADaMoSHiFiGAN.decode_windowed, equal to a whole
  decode up to rounding), each window replayed from one CUDA graph: any length, bounded memory,
  one set of cuDNN algorithms.
- dcae_decoder: the decoder's upsampling part (everything after its globally attending stage) in
  fixed windows of latent frames (dcae.latents_to_mel_windowed, equal to a whole decode up to
  rounding), one CUDA graph, bounded memory; without cuDNN's per-length algorithm search.
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from acestep_triton.models.dcae import decode_local_part
from acestep_triton.registry import component, resolve
from acestep_triton.sampling.seeds import latent_frames

if TYPE_CHECKING:
    from acestep_triton.lora import AdapterStore


class TorchEngine(Protocol):
    """What the speed-ups use of acestep_triton.engines.TorchEngine; a Protocol so that this module
    does not import engines, which loads it (no import cycle)."""

    device: torch.device
    module: torch.nn.Module
    spec: object
    adapters: AdapterStore | None

    def run(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Acceleration:
    """Which speed-ups `accelerate_engine` applies (all on for the gpu profile)."""

    compile_blocks: bool = True
    # the Triton linear-attention kernel (models/linear_attention_kernel.py): off until tuned and
    # measured inside the compiled, graphed decode (benchmarks/NOTES.md: one layer checked on the GPU)
    fused_linear_attention: bool = False
    decode_graphs: bool = True
    frame_bucket: int = 16  # latent frames (~0.19 s of audio)
    # condition tokens: padded tokens cost only masked cross-attention (<= 2.5 % of a 60 s decode;
    # their K/V are computed once per request), and one bucket for every request up to 512 tokens
    # lets the graphs captured at load serve them all
    token_bucket: int = 512
    # batch rows (guidance branches x requests) are padded up to one of these, repeating the first row
    row_buckets: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    max_graphs: int = 32
    # decode graphs captured at load (one token bucket), so that a request of a common length never
    # waits for a capture: (audio seconds) x (rows: one guidance branch, two)
    warm_seconds: tuple[float, ...] = (30.0, 60.0, 120.0, 240.0)
    warm_rows: tuple[int, ...] = (1, 2)
    # (rows, tokens) shapes whose conditions' cross-attention K/V stay held (~126 MiB per 512-token
    # row at full size): a request needs two (guided and unguided steps)
    max_held_conditions: int = 2
    # mel frames (~23.8 s of audio); None decodes whole. Windows keep one shape, so cuDNN's algorithm
    # search (seconds to a minute for a new length) runs once at warm-up; the overlap costs 9-19 %.
    vocoder_window_frames: int | None = 2048
    # windows (of all items and channels together) per vocoder graph call; one fixed shape
    vocoder_window_batch: int = 2
    vocoder_graphs: bool = True
    # DCAE: the local (upsampling) part in windows of latent frames (~21.6 s: 60, 120 and 240 s
    # requests decode ~8 % more frames than they keep), one graph; None decodes whole
    dcae_window_frames: int | None = 232
    vocoder_channels_last: bool = True
    # cuDNN benchmark mode for the vocoder (its heuristics pick algorithms up to 30x slower); the
    # DCAE runs without it: < 2 % slower, and no algorithm search (seconds) for every new length
    cudnn_benchmark: bool = True
    tf32_matmul: bool = True


class CudaGraphs:
    """Calls fn(*tensors) -> tensor through CUDA graphs captured once per input shapes and dtypes.

    Inputs are copied into the graph's static tensors and the output is cloned out of it, so a
    result stays valid after the next replay. An input that already is the graph's static tensor
    is not copied: inputs at the `resident` positions are captured as given (not cloned), so a
    caller that keeps such a tensor and updates it in place (BucketedDecode's cross-attention
    keys/values) pays no copy per call. Graphs share one memory pool, which is safe because
    they are replayed one at a time on one stream; the least recently used one is dropped beyond
    `max_graphs`. Call under torch.inference_mode (TorchEngine.run does).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 8, warmup_runs: int = 2,
                 resident: tuple[int, ...] = ()) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.resident = resident
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
            if static is not value:
                static.copy_(value)
        graph.replay()
        return static_output.clone()

    def _capture(self, key: tuple, tensors: tuple[torch.Tensor, ...]) -> None:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static_inputs = tuple(t if i in self.resident else t.clone() for i, t in enumerate(tensors))
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


@dataclass
class _HeldConditions:
    """Conditions seen last for one padded (rows, tokens) shape and their cross-attention K/V."""

    states: torch.Tensor
    mask: torch.Tensor
    keys_values: torch.Tensor
    bias: torch.Tensor


class BucketedDecode:
    """`transformer.decode` with frames and condition tokens zero-padded up to bucket multiples
    (masks zeroed there) and rows padded up to a row bucket (copies of the first row), run through
    CudaGraphs; returns the velocity of the real rows and frames only. Buckets bound the number of
    graphs a server needs whatever lengths and batch sizes its requests bring.

    The conditions are the same at every step of a request, so their cross-attention keys and
    values (`prepare_cross_attention`) are computed only when they change: per padded
    (rows, tokens) shape the last conditions seen and their K/V are held, compared exactly with the
    incoming ones (one device comparison and a host sync per step), and the held K/V tensors are the
    graphs' own inputs (resident: updated in place, never copied per step). The guided and unguided
    steps of a request have different row counts, so each keeps its own entry.

    LoRA adapters (`adapters`, the engine's acestep_triton.lora.AdapterStore): a graph replays the
    kernels it captured, which hold no adapter's factors. So the rows of a batch that use an adapter
    are decoded apart and eagerly: the compiled blocks run uncompiled (their trace has the adapter
    hooks inactive; tracing each mix of adapters would recompile at request time), and those rows'
    condition K/V are computed for them (they depend on the adapter through to_k/to_v) instead of
    being held. The batch's base-model rows go through the graphs as a batch of their own, so
    adapters cost them nothing: they decode exactly as if the adapter rows were not in the batch.
    """

    def __init__(self, transformer: torch.nn.Module, settings: Acceleration, adapters: AdapterStore | None = None) -> None:
        self.eager = transformer.decode
        self.adapters = adapters
        self.frame_bucket = settings.frame_bucket
        self.token_bucket = settings.token_bucket
        self.row_buckets = settings.row_buckets
        self.prepare = transformer.prepare_cross_attention
        decode = transformer.decode_prepared
        self.run = CudaGraphs(decode, settings.max_graphs, resident=(2, 3)) if settings.decode_graphs else decode
        self.max_held = settings.max_held_conditions
        self.held: OrderedDict[tuple, _HeldConditions] = OrderedDict()

    def __call__(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale) -> torch.Tensor:
        inputs = (latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale)
        if self.adapters is None or self.adapters.active is None:
            return self.graphed(*inputs)
        adapted = self.adapters.active.adapted_rows()
        plain = sorted(set(range(latents.shape[0])) - set(adapted))
        velocity = None
        for rows, decode in ((adapted, self.decode_eagerly), (plain, self.graphed)):
            if not rows:
                continue
            index = torch.tensor(rows, device=latents.device)
            with self.adapters.only(rows):
                part = decode(*(t.index_select(0, index) for t in inputs))
            if velocity is None:
                velocity = part.new_empty((latents.shape[0], *part.shape[1:]))
            velocity[index] = part
        return velocity

    def decode_eagerly(self, *inputs: torch.Tensor) -> torch.Tensor:
        """`transformer.decode` without compilation or graphs (rows with adapters)."""
        with torch.compiler.set_stance("force_eager"):
            return self.eager(*inputs)

    def graphed(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale) -> torch.Tensor:
        """The bucketed decode through the graphs (rows without adapters)."""
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
        latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale = inputs
        keys_values, bias = self.cross_attention(encoder_states, encoder_mask)
        return self.run(latents, attention_mask, keys_values, bias, timestep, q_scale)[:rows, ..., :frames]

    def cross_attention(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The held K/V for these (padded) conditions, recomputed in place when they differ."""
        key = (tuple(states.shape), states.dtype)
        held = self.held.get(key)
        if held is not None:
            self.held.move_to_end(key)
            if torch.equal(held.states, states) and torch.equal(held.mask, mask):
                return held.keys_values, held.bias
            keys_values, bias = self.prepare(states, mask)
            held.keys_values.copy_(keys_values)
            held.bias.copy_(bias)
            held.states.copy_(states)
            held.mask.copy_(mask)
            return held.keys_values, held.bias
        while len(self.held) >= self.max_held:
            self.held.popitem(last=False)
        keys_values, bias = self.prepare(states, mask)
        self.held[key] = _HeldConditions(states.clone(), mask.clone(), keys_values, bias)
        return keys_values, bias


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


@contextmanager
def _no_cudnn_search() -> Iterator[None]:
    """cuDNN benchmark mode off inside (heuristic algorithm choice), restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _without_cudnn_search(forward: Callable[..., tuple]) -> Callable[..., tuple]:
    def run(*args: torch.Tensor) -> tuple:
        with _no_cudnn_search():
            return forward(*args)

    return run


def _encoder_warmup_batch(engine: TorchEngine, rows: int = 2, tokens: int = 64) -> dict[str, torch.Tensor]:
    """Inputs of the right shapes for an encoder's spec: small ids, masks and scales of ones."""
    batch = {}
    for spec in engine.spec.inputs:
        shape = (rows, *(tokens if d == -1 else d for d in spec.dims))
        if spec.name.endswith("_IDS"):
            batch[spec.name] = torch.randint(0, 100, shape)
        elif spec.dtype == "TYPE_INT64":
            batch[spec.name] = torch.ones(shape, dtype=torch.int64)
        elif spec.name.endswith("_STATES"):
            batch[spec.name] = torch.randn(shape)
        else:
            batch[spec.name] = torch.ones(shape)
    return batch


def accelerate_engine(name: str, engine: TorchEngine, settings: Acceleration = Acceleration()) -> None:
    """Apply `settings` to a loaded CUDA engine in place and warm it up through the component's
    registry hook (compilation, the decode graphs of the common shapes, the decoders' window graphs
    and cuDNN search happen there)."""
    if engine.device.type != "cuda":
        raise ValueError(f"accelerate: the gpu speed-ups need a CUDA device, got {engine.device}")
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32_matmul
    hook = component(name).acceleration
    if hook:
        resolve(hook)(engine, settings)
    torch.cuda.synchronize(engine.device)


def accelerate_dit_step(engine: TorchEngine, settings: Acceleration) -> None:
    """dit_step's hook: (optionally) the fused linear attention, compiled blocks, bucketed CUDA-graph
    decodes; warmed up at two row counts, then the graphs of the common lengths captured."""
    module = engine.module
    if settings.fused_linear_attention:
        from acestep_triton.models.linear_attention_kernel import fused_linear_attention

        for block in module.transformer.transformer_blocks:
            block.attn.fused = fused_linear_attention
    if settings.compile_blocks:
        compile_blocks(module.transformer)
    module.decode = BucketedDecode(module.transformer, settings, engine.adapters)
    # first calls: different frame and token counts, so dynamic shapes do not tie the two together
    for rows in (1, 2):
        engine.run(_dit_warmup_batch(engine, rows, 5 * settings.frame_bucket, settings.token_bucket))
    for seconds in settings.warm_seconds:
        for rows in settings.warm_rows:
            engine.run(_dit_warmup_batch(engine, rows, latent_frames(seconds), settings.token_bucket))


def accelerate_encoder(engine: TorchEngine, settings: Acceleration) -> None:
    """text_encoder's and condition_encoder's hook: eager, run once so that the kernels and cuBLAS
    handles the first request would otherwise wait for are loaded."""
    engine.run(_encoder_warmup_batch(engine))


def accelerate_dcae_decoder(engine: TorchEngine, settings: Acceleration) -> None:
    """dcae_decoder's hook: no per-length cuDNN search; the local upsampling part in windows
    replayed from a CUDA graph; warmed up."""
    module = engine.module
    module.forward = _without_cudnn_search(module.forward)
    module.window_frames = settings.dcae_window_frames
    if settings.dcae_window_frames is not None:
        module.window_batch = 1
        module.decode_window = CudaGraphs(partial(decode_local_part, module.dcae), max_graphs=2)
    channels, height, _ = engine.spec.inputs[0].dims
    engine.run({"LATENTS": torch.randn(1, channels, height, latent_frames(settings.warm_seconds[0]))})


def accelerate_vocoder(engine: TorchEngine, settings: Acceleration) -> None:
    """vocoder's hook: channels-last head, windows of all items and channels decoded in fixed groups
    replayed from a CUDA graph; warmed up."""
    module = engine.module
    module.vocoder.head.channels_last = settings.vocoder_channels_last
    module.window_frames = settings.vocoder_window_frames
    module.window_batch = settings.vocoder_window_batch
    if settings.vocoder_window_frames is not None:
        if settings.vocoder_graphs:
            module.decode_window = CudaGraphs(module.vocoder.decode, max_graphs=2)
        n_mels = module.vocoder.config.n_mels
        engine.run({"MEL": torch.randn(1, 2, n_mels, 2 * settings.vocoder_window_frames) - 5.0})
