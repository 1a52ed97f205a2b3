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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from acestep_triton.condition_cache import ConditionRow, condition_rows, stack_rows
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
    # batch rows (guidance branches x requests) are padded up to one of these, repeating the first
    # row; more rows run as several decodes: a row-decode costs ~7.6 ms alone and ~7.0 ms in a batch
    # of 16 at 60 s (benchmarks/NOTES.md), so larger graphs would gain little and hold more memory
    row_buckets: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    # the most rows x padded frames one decode runs (8 rows at 60 s, 4 at 120 s, 2 at 240 s): bounds
    # the graphs' activation memory by what the warm 240 s captures need anyway
    max_decode_row_frames: int = 8 * 656
    max_graphs: int = 32
    # decode graphs captured at load (one token bucket), so that a request of a common length never
    # waits for a capture: (audio seconds) x (rows: one guidance branch, two)
    warm_seconds: tuple[float, ...] = (30.0, 60.0, 120.0, 240.0)
    warm_rows: tuple[int, ...] = (1, 2)
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
    result stays valid after the next replay. An input that already lies where the graph reads it
    is not copied: inputs at the `resident` positions are captured as given (not cloned), so a
    caller that keeps such a tensor and updates it in place (BucketedDecode's cross-attention
    keys/values, passed as views of one buffer) pays no copy per call. Graphs share one memory
    pool, which is safe because they are replayed one at a time on one stream; the least recently used one is dropped beyond
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
            if static.data_ptr() != value.data_ptr():
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


class _RowBuffer:
    """The decode graphs' cross-attention input: `rows` rows of prepared keys/values and additive
    masks of up to `tokens` tokens, shared by every graph (a graph of n rows reads the first n, so
    every graph is captured on views of this one buffer). A row is copied in only when the
    ConditionRow it holds (by serial) is another one, so the steps of a request, and of requests
    batched in the same order, copy nothing. Zero-initialised: a row never written is finite."""

    def __init__(self, rows: int, tokens: int, like: ConditionRow) -> None:
        shape = (*like.tokens.shape[:-2], tokens, like.tokens.shape[-1])
        self.keys_values = torch.zeros(rows, *shape, dtype=like.tokens.dtype, device=like.tokens.device)
        self.bias = torch.zeros(rows, tokens, dtype=like.mask.dtype, device=like.mask.device)
        self.serials: list[int | None] = [None] * rows

    def load(self, rows: Sequence[ConditionRow], count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `count` buffer rows, the first len(rows) holding `rows` (shorter rows
        padded with masked tokens); the rest hold whatever they held (finite; their output is unused)."""
        tokens = self.bias.shape[1]
        for i, row in enumerate(rows):
            if self.serials[i] == row.serial:
                continue
            self.keys_values[i, ..., : row.length, :].copy_(row.tokens)
            self.bias[i, : row.length].copy_(row.mask)
            if row.length < tokens:
                self.keys_values[i, ..., row.length :, :].zero_()
                self.bias[i, row.length :].fill_(float("-inf"))
            self.serials[i] = row.serial
        return self.keys_values[:count], self.bias[:count]


class BucketedDecode:
    """The dit_step decode (`DiTStepComponent`'s `decode`, `prepare` and `decode_rows`) with frames
    and condition tokens zero-padded up to bucket multiples (masked there) and rows padded up to a
    row bucket (copies of the first row), run through CudaGraphs; returns the velocity of the real
    rows and frames only. Buckets bound the number of graphs a server needs whatever lengths and
    batch sizes its requests bring; more rows than the largest bucket (or than
    `max_decode_row_frames` allows) run as several decodes.

    Conditions arrive prepared (`prepare`: cross-attention keys/values, padded to the token bucket,
    computed once per request by dit_step's condition cache) and reach the graphs through one
    shared `_RowBuffer` per token length, into which a row is copied only when another row was
    there: no comparison of tensors, no host synchronisation, no recomputation when requests mix.
    The spec's `decode` (a direct client, the warm-up) prepares its conditions for that call alone.

    LoRA adapters (`adapters`, the engine's acestep_triton.lora.AdapterStore; both calls run inside
    its `applied` block): a graph replays the kernels it captured, which hold no adapter's factors.
    `prepare` is eager, so an adapted row's keys/values come out of its adapted to_k/to_v (the
    condition cache keys them by adapter and weight). `decode_rows` decodes the rows that use an
    adapter apart and eagerly: the compiled blocks run uncompiled (their trace has the adapter hooks
    inactive; tracing each mix of adapters would recompile at request time), from those rows' own
    prepared keys/values stacked, never through the `_RowBuffer`. The batch's base-model rows go
    through the graphs as a batch of their own, so adapters cost them nothing: they decode exactly as
    if the adapter rows were not in the batch.
    """

    def __init__(self, transformer: torch.nn.Module, settings: Acceleration,
                 adapters: AdapterStore | None = None) -> None:
        self.transformer = transformer
        self.adapters = adapters
        self.frame_bucket = settings.frame_bucket
        self.token_bucket = settings.token_bucket
        self.row_buckets = tuple(sorted(settings.row_buckets))
        self.max_row_frames = settings.max_decode_row_frames
        decode = transformer.decode_prepared
        self.run = CudaGraphs(decode, settings.max_graphs, resident=(2, 3)) if settings.decode_graphs else decode
        self.buffers: dict[int, _RowBuffer] = {}

    def __call__(self, latents, attention_mask, encoder_states, encoder_mask, timestep, q_scale) -> torch.Tensor:
        return self.decode_rows(latents, attention_mask, self.prepare(encoder_states, encoder_mask), timestep, q_scale)

    def prepare(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor) -> list[ConditionRow]:
        """Per row, the cross-attention keys/values and additive mask, tokens padded to the bucket."""
        token_pad = -encoder_states.shape[1] % self.token_bucket
        if token_pad:
            encoder_states = F.pad(encoder_states, (0, 0, 0, token_pad))
            encoder_mask = F.pad(encoder_mask, (0, token_pad))
        return condition_rows(*self.transformer.prepare_cross_attention(encoder_states, encoder_mask))

    def decode_rows(self, latents: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[ConditionRow],
                    timestep: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """`DiTStepComponent.decode_rows`: the rows with an adapter eagerly, the others through the graphs."""
        active = None if self.adapters is None else self.adapters.active
        if active is None:
            return self._graphed(latents, attention_mask, rows, timestep, q_scale)
        adapted = active.adapted_rows()
        plain = sorted(set(range(latents.shape[0])) - set(adapted))
        velocity = None
        for subset, decode in ((adapted, self._eager), (plain, self._graphed)):
            if not subset:
                continue
            index = torch.tensor(subset, device=latents.device)
            with self.adapters.only(subset):
                part = decode(latents[index], attention_mask[index], [rows[i] for i in subset], timestep[index],
                              q_scale[index])
            if velocity is None:
                velocity = part.new_empty((latents.shape[0], *part.shape[1:]))
            velocity[index] = part
        return velocity

    def _eager(self, latents: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[ConditionRow],
               timestep: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """The decode of rows with adapters: uncompiled, no graphs, their prepared keys/values stacked."""
        with torch.compiler.set_stance("force_eager"):
            return self.transformer.decode_prepared(latents, attention_mask, *stack_rows(rows, float("-inf")),
                                                    timestep, q_scale)

    def _graphed(self, latents: torch.Tensor, attention_mask: torch.Tensor, rows: Sequence[ConditionRow],
                 timestep: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
        """The bucketed decode through the graphs (rows without adapters)."""
        frames = latents.shape[-1]
        frame_pad = -frames % self.frame_bucket
        if frame_pad:
            latents = F.pad(latents, (0, frame_pad))
            attention_mask = F.pad(attention_mask, (0, frame_pad))
        per_decode = max(1, min(self.row_buckets[-1], self.max_row_frames // latents.shape[-1]))
        parts = [self._decode(latents[i : i + per_decode], attention_mask[i : i + per_decode],
                              rows[i : i + per_decode], timestep[i : i + per_decode], q_scale[i : i + per_decode])
                 for i in range(0, latents.shape[0], per_decode)]
        velocity = parts[0] if len(parts) == 1 else torch.cat(parts)
        return velocity[..., :frames]

    def _decode(self, latents, attention_mask, rows, timestep, q_scale) -> torch.Tensor:
        count = latents.shape[0]
        bucket = next(b for b in self.row_buckets if b >= count)
        inputs = (latents, attention_mask, timestep, q_scale)
        if bucket > count:
            inputs = tuple(torch.cat([t, t[:1].expand(bucket - count, *t.shape[1:])]) for t in inputs)
        latents, attention_mask, timestep, q_scale = inputs
        tokens = max(row.length for row in rows)
        tokens += -tokens % self.token_bucket
        if tokens not in self.buffers:
            self.buffers[tokens] = _RowBuffer(self.row_buckets[-1], tokens, rows[0])
        keys_values, bias = self.buffers[tokens].load(rows, bucket)
        return self.run(latents, attention_mask, keys_values, bias, timestep, q_scale)[:count]


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
    torch.cuda.empty_cache()  # what warm-up and capture left cached outside the graphs' pools


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
    decode = BucketedDecode(module.transformer, settings, engine.adapters)
    module.decode, module.prepare, module.decode_rows = decode, decode.prepare, decode.decode_rows
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
