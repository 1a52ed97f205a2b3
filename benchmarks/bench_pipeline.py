"""Speed of the in-process pipeline on full-size random weights (bf16), per stage.

    python -m benchmarks.bench_pipeline --out DIR [--configs 60:27,60:60,240:27,240:60]
        [--runs 3] [--sections pipeline,batching,equality,numerics] [--budget-s 540]

Weights cannot be downloaded here, and speed does not depend on their values: every component is
built from its published config.json (benchmarks/full_size_configs/) with seeded random init,
directly on the GPU. The prompt tokenizer is a stand-in (words and punctuation hashed into the
UMT5 vocabulary: only the token count matters for speed); lyrics go through the real
LyricTokenizer (vocabulary from --lyric-vocab). Sampling settings are the contract defaults
(euler, APG 15, interval 0.5, ERG tag/lyric/diffusion on), the official benchmark's settings.

Sections (each one's numbers land in results.json as it finishes; a failing section is logged
and the next one runs; the command exits non-zero if a section failed or a bound was exceeded):
  pipeline  the accelerated pipeline (acestep_triton.acceleration) for every --configs entry: the
            first request of that length (cold start against the 1.5x bound), then the median of
            --runs, stage times, RTF, peak memory, the FLOP floor of its decodes; load + warm-up time
  batching  N seeds in one call (--batching-items, at --batching-config): per-stage medians,
            aggregate RTF, FLOP floor, peak memory
  equality  --equality-items seeds in one call against each seed alone: relative L2 of the
            waveforms, bound 1e-2 (bf16)
  numerics  bf16 (eager and accelerated) against float32 on the same random weights, inputs and
            seed: relative L2 error of one decode, of the final latents and of the waveform
Diagnostics, not in the default list:
  eager     our bf16 pipeline without the gpu speed-ups, 60 s / 27 steps: the starting point
  decode    one transformer decode at 60 s and 240 s with 1 and 2 rows: eager, compiled blocks,
            compiled blocks + CUDA graph; FLOPs counted from the config give TFLOP/s
  decoders  DCAE, and vocoder variants: NCL vs channels-last head, whole signal vs windows + graph
  vocoder_batch  the vocoder with 2, 4, 8 windows per graph call, 1 and 8 items
  profile   kernel tables (profile.txt) of a compiled decode (60 s with 1, 2, 16 rows; 240 s with 2),
            of one vocoder window group and of a 60 s DCAE decode
  attention the cross-attention SDPA call with boolean, additive and no mask
Prints a short table last; writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from acestep_triton.acceleration import Acceleration, CudaGraphs, accelerate_engine
from acestep_triton.checkpoint import DCAE_DIR, TEXT_ENCODER_DIR, TRANSFORMER_DIR, VOCODER_DIR, Checkpoint
from acestep_triton.components import keep_parts
from acestep_triton.contract import GenerationParams
from acestep_triton.engines import TorchEngine
from acestep_triton.lyrics import LyricTokenizer
from acestep_triton.models.text_encoder import TextEncoder
from acestep_triton.models.transformer import ACEStepTransformer
from acestep_triton.models.vocoder import ADaMoSHiFiGAN
from acestep_triton.pipeline import Text2MusicPipeline
from acestep_triton.sampling.guidance import Guidance
from acestep_triton.sampling.schedulers import flow_match_schedule
from acestep_triton.sampling.seeds import latent_frames
from acestep_triton.registry import NEURAL_COMPONENTS, component, component_spec, resolve

HERE = Path(__file__).resolve().parent
FULL_SIZE_CONFIGS = HERE / "full_size_configs"
DEFAULT_LYRIC_VOCAB = HERE.parent / ".bench_assets" / "lyric_vocab.json"
WEIGHT_SEED = 0
REQUEST_SEED = 1234
# Relative L2 error of bf16 against float32 that one decode, the final latents and the waveform must
# stay under (bf16 without the speed-ups measured 1.4e-2, 1.5e-2, 3.2e-3 on the H100).
NUMERICS_BOUND = 2e-2
# Relative L2 error an item decoded together with others may have against its solo run (bf16).
BATCHED_VS_SOLO_BOUND = 1e-2
# bf16 matrix-product ceiling of the H200 and H100 (benchmarks/NOTES.md): the FLOP floor's rate.
PEAK_TFLOPS = 790.0
# A first request of a new length may take this much longer than its steady state.
COLD_START_BOUND = 1.5

PROMPT = ("synthwave, retro, driving bass, gated drums, analog pads, arpeggiated synth, "
          "male vocal, 118 BPM, nocturnal, cinematic, energetic, wide stereo")
LYRICS = """[verse]
Headlights paint the empty road
Chrome and static, heavy load
Every signal fading slow
Radio plays what we both know

[verse]
Concrete rivers, silver rain
Counting mile marks down the lane
Engines humming in the dark
Chasing down a distant spark

[chorus]
Drive on, drive on into the light
Hold the wheel and hold on tight
Every city sings our name
Burning bright and still the same

[verse]
Neon letters on the wall
Shadows dancing, standing tall
Memories in black and white
Rolling on through endless night

[bridge]
Voices calling from the past
Nothing here was built to last
Turn the dial and let it ring
Hear the midnight engines sing

[chorus]
Drive on, drive on into the light
Hold the wheel and hold on tight
Every city sings our name
Burning bright and still the same
"""


class HashPromptTokenizer:
    """Stand-in for the UMT5 tokenizer: each word or punctuation mark is one id (a hash into the
    vocabulary), then </s>. Only the token count matters for speed."""

    def __init__(self, vocab_size: int, eos_id: int = 1) -> None:
        self.vocab_size, self.eos_id = vocab_size, eos_id

    def tokenize_one(self, prompt: str) -> tuple[list[int], list[int]]:
        words = re.findall(r"\w+|[^\w\s]", prompt)
        ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words] + [self.eos_id]
        return ids, [1] * len(ids)


# ----------------------------------------------------------------------------- models


def build_models(config_dir: Path, device: torch.device, seed: int = WEIGHT_SEED,
                 prune: bool = True) -> dict[str, torch.nn.Module]:
    """Every neural model at its published size, float32, seeded random init on `device`; `prune`
    drops the transformer's training-only heads, as loading a component does."""
    from diffusers import AutoencoderDC
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = ACEStepTransformer.from_config(ACEStepTransformer.load_config(config_dir / TRANSFORMER_DIR))
        umt5 = UMT5EncoderModel(UMT5Config.from_json_file(config_dir / TEXT_ENCODER_DIR / "config.json"))
        dcae = AutoencoderDC.from_config(AutoencoderDC.load_config(config_dir / DCAE_DIR))
        vocoder = ADaMoSHiFiGAN.from_config(ADaMoSHiFiGAN.load_config(config_dir / VOCODER_DIR))
    if prune:
        keep_parts(transformer, ("condition_encoder", "dit_step"))
    return {"transformer": transformer, "umt5": umt5.eval(), "dcae": dcae.eval(), "vocoder": vocoder.eval()}


def make_engines(models: dict[str, torch.nn.Module], config_dir: Path, device: torch.device,
                 dtype: torch.dtype) -> dict[str, TorchEngine]:
    """The five component engines over `models` (condition_encoder and dit_step share the transformer)."""
    per_component = {
        "text_encoder": TextEncoder(models["umt5"], tokenizer=None),
        "condition_encoder": models["transformer"],
        "dit_step": models["transformer"],
        "dcae_decoder": models["dcae"],
        "vocoder": models["vocoder"],
    }
    ckpt = Checkpoint(config_dir)
    engines = {}
    for name in NEURAL_COMPONENTS:
        module = resolve(component(name).module)(per_component[name]).to(device=device, dtype=dtype).eval()
        engines[name] = TorchEngine(component_spec(name, ckpt), module.requires_grad_(False), device, dtype)
    return engines


def make_pipeline(engines: dict[str, TorchEngine], lyric_vocab: Path, device: torch.device,
                  vocab_size: int) -> Text2MusicPipeline:
    return Text2MusicPipeline(HashPromptTokenizer(vocab_size), LyricTokenizer.from_file(lyric_vocab),
                              {name: engine.run for name, engine in engines.items()}, device)


def accelerate_all(engines: dict[str, TorchEngine], settings: Acceleration) -> dict[str, float]:
    """Apply the gpu profile to every engine; returns the seconds each took (compile, warm-up, capture)."""
    seconds = {}
    for name, engine in engines.items():
        start = time.perf_counter()
        accelerate_engine(name, engine, settings)
        seconds[name] = time.perf_counter() - start
    return seconds


def request(duration: float, steps: int, items: int = 1) -> GenerationParams:
    return GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, infer_step=steps,
                            actual_seeds=tuple(REQUEST_SEED + i for i in range(items)))


def row_decodes(params: GenerationParams) -> int:
    """Transformer rows decoded over a request: guidance branches per step x items."""
    schedule = flow_match_schedule(params.scheduler_type, params.infer_step, params.oss_steps)
    guidance = Guidance(params, schedule.num_inference_steps)
    per_item = sum(len(guidance.branches(i)) for i in range(len(schedule.timesteps)))
    return per_item * len(params.actual_seeds)


# ----------------------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> dict[str, float]:
    """Median, min and max wall seconds of fn() over `runs` after `warmup` calls (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": runs}


def memory_gib(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def decode_flops(config, rows: int, frames: int, tokens: int) -> float:
    """Multiply-add FLOPs (x2) of one decode: projections, GLU feed-forward, both attentions."""
    dim, ff = config.inner_dim, int(config.inner_dim * config.mlp_ratio)
    head_dim, heads = config.attention_head_dim, config.num_attention_heads
    per_frame = 4 * dim * dim + 2 * dim * dim + dim * 2 * ff + ff * dim  # self q,k,v,o; cross q,o; GLU
    per_token = 2 * dim * dim  # cross k, v
    attention = 2 * heads * (head_dim + 1) * head_dim * frames + 2 * frames * tokens * dim
    per_block = per_frame * frames + per_token * tokens + attention
    return 2.0 * rows * config.num_layers * per_block


def run_pipeline(pipe: Text2MusicPipeline, params: GenerationParams, device: torch.device,
                 runs: int, warmup: int = 1) -> dict:
    """Warm-up, then `runs` timed requests: median total and stage seconds, RTF, peak memory."""
    for _ in range(warmup):
        pipe(params)
    reset_memory(device)
    records = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        result = pipe(params)
        sync(device)
        records.append({"total": time.perf_counter() - start, **result.timings})
    median = {key: statistics.median(r[key] for r in records) for key in records[0]}
    staged = sum(v for k, v in median.items() if k != "total")
    median["outside_stages"] = median["total"] - staged
    items = len(params.actual_seeds)
    return {"duration_s": result.duration, "steps": params.infer_step, "frames": latent_frames(result.duration),
            "items": items, "median": median, "rtf": items * result.duration / median["total"],
            "min_total_s": min(r["total"] for r in records), "max_total_s": max(r["total"] for r in records),
            "runs": runs, "samples": int(result.waveforms.shape[-1]), **memory_gib(device)}


# ----------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.config_dir = Path(args.config_dir)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.results: dict = {"env": environment(args), "sections": {}}
        self.failures: list[str] = []
        self.accelerated = False
        self.models: dict | None = None
        self.engines: dict | None = None
        self.pipe: Text2MusicPipeline | None = None
        self.vocab_size = json.loads((self.config_dir / TEXT_ENCODER_DIR / "config.json").read_text())["vocab_size"]

    def settings(self) -> Acceleration:
        """The gpu profile, with the vocoder window from the command line (0: whole decode)."""
        return Acceleration(vocoder_window_frames=self.args.vocoder_window or None,
                            vocoder_window_batch=self.args.vocoder_window_batch,
                            fused_linear_attention=self.args.fused_linear_attention)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        if self.elapsed() > self.args.budget_s:
            print(f"SKIP {name}: {self.elapsed():.0f} s elapsed > budget", flush=True)
            self.results["sections"][name] = {"skipped": "time budget"}
            return
        print(f"== {name} ({self.elapsed():.0f} s)", flush=True)
        try:
            self.results["sections"][name] = fn()
        except Exception as exc:  # keep the other sections' numbers
            traceback.print_exc()
            self.results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        self.save()

    def ensure_models(self) -> None:
        if self.models is None:
            start = time.perf_counter()
            models = build_models(self.config_dir, self.device)
            self.models = {k: m.to(self.dtype) for k, m in models.items()}
            self.engines = make_engines(self.models, self.config_dir, self.device, self.dtype)
            self.pipe = make_pipeline(self.engines, Path(self.args.lyric_vocab), self.device, self.vocab_size)
            self.results["env"]["build_s"] = time.perf_counter() - start
            self.results["env"]["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in self.models.items()}
            prepared = self.pipe.prepare(request(10.0, 1))
            self.results["env"]["prompt_tokens"] = int(prepared.text_ids.shape[1])
            self.results["env"]["lyric_tokens"] = int(prepared.lyric_ids.shape[1])
            reset_memory(self.device)

    # -- eager: the starting point
    def eager(self) -> dict:
        self.ensure_models()
        seconds, steps = self.args.eager_config.split(":")
        out = run_pipeline(self.pipe, request(float(seconds), int(steps)), self.device, runs=self.args.eager_runs)
        print_pipeline_row("eager", out)
        return out

    # -- one decode
    def decode_inputs(self, rows: int, frames: int, tokens: int) -> dict[str, torch.Tensor]:
        config = self.models["transformer"].config
        g = torch.Generator().manual_seed(7)
        return {
            "LATENTS": torch.randn(rows, config.in_channels, config.max_height, frames, generator=g),
            "ATTENTION_MASK": torch.ones(rows, frames),
            "ENCODER_STATES": torch.randn(rows, tokens, config.inner_dim, generator=g),
            "ENCODER_MASK": torch.ones(rows, tokens),
            "TIMESTEP": torch.full((rows, 1), 640.0),
            "Q_SCALE": torch.tensor([1.0, 0.01]).repeat(rows)[:rows].reshape(rows, 1),
        }

    def decode(self) -> dict:
        self.ensure_models()
        engine = self.engines["dit_step"]
        module = engine.module
        config = self.models["transformer"].config
        tokens = 1 + self.results["env"]["prompt_tokens"] + self.results["env"]["lyric_tokens"]
        shapes = [(rows, latent_frames(seconds), seconds) for seconds in (60.0, 240.0) for rows in (1, 2)]
        results = []

        def measure(variant: str) -> None:
            for rows, frames, seconds in shapes:
                batch = {k: v.to(self.device) for k, v in self.decode_inputs(rows, frames, tokens).items()}
                timing = time_call(lambda: engine.run(batch), self.device, runs=self.args.decode_runs, warmup=3)
                flops = decode_flops(config, rows, frames, tokens)
                row = {"variant": variant, "audio_s": seconds, "rows": rows, "frames": frames, "tokens": tokens,
                       "ms": timing["median_s"] * 1e3, "tflop": flops / 1e12,
                       "tflops_per_s": flops / timing["median_s"] / 1e12}
                results.append(row)
                print(f"  decode {variant:>16} {seconds:5.0f}s rows {rows}: {row['ms']:7.2f} ms  "
                      f"{row['tflops_per_s']:6.1f} TFLOP/s", flush=True)

        measure("eager")
        torch.backends.cuda.matmul.allow_tf32 = True  # as the gpu profile (and upstream's GPU pipeline)
        start = time.perf_counter()
        from acestep_triton.acceleration import compile_blocks

        compile_blocks(module.transformer)
        measure("compiled")
        compile_s = time.perf_counter() - start
        graphs = CudaGraphs(module.transformer.decode)
        module.decode = graphs
        measure("compiled+graph")
        module.decode = module.transformer.decode
        return {"rows": results, "compile_and_measure_s": compile_s}

    # -- DCAE and vocoder variants
    def decoders(self) -> dict:
        self.ensure_models()
        dcae_engine, vocoder_engine = self.engines["dcae_decoder"], self.engines["vocoder"]
        config = self.models["transformer"].config
        results = []

        def record(stage: str, variant: str, seconds: float, fn: Callable[[], object]) -> None:
            reset_memory(self.device)
            sync(self.device)
            first_start = time.perf_counter()
            fn()
            sync(self.device)
            first = time.perf_counter() - first_start
            timing = time_call(fn, self.device, runs=self.args.decoder_runs, warmup=0)
            row = {"stage": stage, "variant": variant, "audio_s": seconds, "first_call_s": first,
                   "ms": timing["median_s"] * 1e3, **memory_gib(self.device)}
            results.append(row)
            print(f"  {stage:>6} {variant:>24} {seconds:5.0f}s: {row['ms']:8.2f} ms (first {first * 1e3:8.1f} ms) "
                  f"peak {row.get('peak_allocated_gib', 0):.2f} GiB", flush=True)

        for seconds in (60.0, 240.0):
            frames = latent_frames(seconds)
            g = torch.Generator().manual_seed(3)
            latents = {"LATENTS": torch.randn(1, config.out_channels, config.max_height, frames, generator=g)}
            mel = {"MEL": dcae_engine.run(latents)["MEL"]}
            module = vocoder_engine.module
            torch.backends.cudnn.benchmark = True
            record("dcae", "cudnn_benchmark", seconds, lambda: dcae_engine.run(latents))
            for channels_last in (False, True):
                module.vocoder.head.channels_last = channels_last
                layout = "channels-last" if channels_last else "NCL"
                record("vocoder", f"whole {layout}", seconds, lambda: vocoder_engine.run(mel))
                for window in (1024, 2048):
                    module.window_frames = window
                    module.decode_window = CudaGraphs(module.vocoder.decode, max_graphs=2)
                    record("vocoder", f"window {window} + graph {layout}", seconds, lambda: vocoder_engine.run(mel))
                module.window_frames, module.decode_window = None, module.vocoder.decode
            module.vocoder.head.channels_last = False
        return {"rows": results}

    # -- the accelerated pipeline
    def ensure_accelerated(self) -> None:
        self.ensure_models()
        if not self.accelerated:
            self.accelerated = True
            reset_memory(self.device)
            start = time.perf_counter()
            seconds = accelerate_all(self.engines, self.settings())
            total = self.results["env"]["build_s"] + time.perf_counter() - start
            print(f"  load {self.results['env']['build_s']:.1f} s, accelerate + warm-up "
                  f"{json.dumps({k: round(v, 1) for k, v in seconds.items()})}", flush=True)
            # the first acceleration in the process is the cold start (later ones reuse compiled kernels)
            self.results["env"].setdefault("accelerate_s", seconds)
            self.results["env"].setdefault("load_and_warmup_s", total)

    def pipeline(self) -> dict:
        self.ensure_accelerated()
        config = self.models["transformer"].config
        rows = []
        for entry in self.args.configs.split(","):
            seconds, steps = entry.split(":")
            if self.elapsed() > self.args.budget_s:
                print(f"  skip {entry}: over budget", flush=True)
                continue
            params = request(float(seconds), int(steps))
            sync(self.device)
            start = time.perf_counter()
            self.pipe(params)
            sync(self.device)
            first = time.perf_counter() - start
            row = run_pipeline(self.pipe, params, self.device, runs=self.args.runs, warmup=0)
            row["first_request_s"] = first
            row["first_over_steady"] = first / row["median"]["total"]
            row["floor_s"] = self.floor_s(config, params)
            rows.append(row)
            print_pipeline_row("accel", row)
            print(f"    first request {first:.3f} s = {row['first_over_steady']:.2f}x steady "
                  f"({'within' if row['first_over_steady'] <= COLD_START_BOUND else 'OVER'} {COLD_START_BOUND}x); "
                  f"decode FLOP floor {row['floor_s']:.3f} s", flush=True)
        return {"settings": self.settings().__dict__, "rows": rows}

    def floor_s(self, config, params: GenerationParams) -> float:
        """Seconds the request's decodes take at the bf16 matrix-product ceiling (decoders excluded)."""
        tokens = 1 + self.results["env"]["prompt_tokens"] + self.results["env"]["lyric_tokens"]
        flops = decode_flops(config, row_decodes(params), latent_frames(params.audio_duration), tokens)
        return flops / (PEAK_TFLOPS * 1e12)

    # -- N items in one call
    def batching(self) -> dict:
        self.ensure_accelerated()
        config = self.models["transformer"].config
        seconds, steps = self.args.batching_config.split(":")
        rows = []
        for items in (int(n) for n in self.args.batching_items.split(",")):
            if self.elapsed() > self.args.budget_s:
                print(f"  skip N={items}: over budget", flush=True)
                continue
            params = request(float(seconds), int(steps), items)
            row = run_pipeline(self.pipe, params, self.device, runs=self.args.batching_runs, warmup=1)
            row["floor_s"] = self.floor_s(config, params)
            rows.append(row)
            print_pipeline_row(f"N={items:2d}", row)
        return {"rows": rows}

    # -- an item in a batch equals its solo run
    def equality(self) -> dict:
        self.ensure_accelerated()
        seconds, steps = self.args.batching_config.split(":")
        items = self.args.equality_items
        together = self.pipe(request(float(seconds), int(steps), items)).waveforms
        errors = []
        for index in range(items):
            solo_params = request(float(seconds), int(steps), 1)
            solo_params = GenerationParams(**{**solo_params.__dict__, "actual_seeds": (REQUEST_SEED + index,)})
            solo = self.pipe(solo_params).waveforms[0]
            errors.append(relative_error(together[index], solo))
        worst = max(errors)
        verdict = "within" if worst < BATCHED_VS_SOLO_BOUND else "OVER"
        print(f"  batched vs solo ({items} items, {seconds} s / {steps}): relative L2 "
              + " ".join(f"{e:.2e}" for e in errors) + f" ({verdict} the {BATCHED_VS_SOLO_BOUND:g} bound)", flush=True)
        if worst >= BATCHED_VS_SOLO_BOUND:
            self.failures.append(f"batched vs solo: {worst:.2e} >= {BATCHED_VS_SOLO_BOUND:g}")
        return {"items": items, "errors": errors, "bound": BATCHED_VS_SOLO_BOUND}

    # -- vocoder window groups: how many windows per graph call
    def vocoder_batch(self) -> dict:
        self.ensure_accelerated()
        module, engine = self.engines["vocoder"].module, self.engines["vocoder"]
        config = self.models["transformer"].config
        results = []
        for window_batch in (2, 4, 8):
            module.window_batch = window_batch
            module.decode_window = CudaGraphs(module.vocoder.decode, max_graphs=2)
            for items, seconds in ((1, 60.0), (8, 60.0), (1, 240.0)):
                latents = torch.randn(items, config.out_channels, config.max_height, latent_frames(seconds))
                mel = {"MEL": self.engines["dcae_decoder"].run({"LATENTS": latents})["MEL"]}
                sync(self.device)
                start = time.perf_counter()
                engine.run(mel)
                sync(self.device)
                first = time.perf_counter() - start
                timing = time_call(lambda: engine.run(mel), self.device, runs=3, warmup=0)
                row = {"window_batch": window_batch, "items": items, "audio_s": seconds,
                       "ms": timing["median_s"] * 1e3, "first_call_s": first}
                results.append(row)
                print(f"  vocoder window batch {window_batch}: {items} x {seconds:.0f} s {row['ms']:.1f} ms "
                      f"(first {first:.1f} s)", flush=True)
        settings = self.settings()
        module.window_batch = settings.vocoder_window_batch
        module.decode_window = CudaGraphs(module.vocoder.decode, max_graphs=2)
        return {"rows": results}

    # -- where the time goes: profiler tables, matmul ceilings, cuDNN heuristics vs benchmark mode
    def profile(self) -> dict:
        """Kernel tables (one file) of a compiled decode at 60 s with 1, 2 and 16 rows and at 240 s with
        2 rows (conditions prepared, no graph), of one vocoder window group and of a 60 s DCAE decode."""
        from torch.profiler import ProfilerActivity, profile

        self.ensure_accelerated()
        transformer = self.models["transformer"]
        tokens = 1 + self.results["env"]["prompt_tokens"] + self.results["env"]["lyric_tokens"]
        summary: dict = {"tables": {}}
        calls: list[tuple[str, Callable[[], object]]] = []
        for seconds, rows in ((60.0, 1), (60.0, 2), (60.0, 16), (240.0, 2)):
            batch = {k: v.to(self.device) for k, v in self.decode_inputs(rows, latent_frames(seconds), tokens).items()}
            inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
            keys_values, bias = transformer.prepare_cross_attention(inputs["ENCODER_STATES"], inputs["ENCODER_MASK"])

            def decode(inputs=inputs, keys_values=keys_values, bias=bias):
                with torch.inference_mode():
                    transformer.decode_prepared(inputs["LATENTS"], inputs["ATTENTION_MASK"], keys_values, bias,
                                                inputs["TIMESTEP"][:, 0], inputs["Q_SCALE"][:, 0])

            calls.append((f"decode_{seconds:.0f}s_rows{rows}", decode))
        vocoder = self.engines["vocoder"].module
        window = torch.randn(vocoder.window_batch or 2, vocoder.vocoder.config.n_mels,
                             vocoder.window_frames or 2048, device=self.device, dtype=self.dtype) - 5.0
        calls.append(("vocoder_window_group", lambda: vocoder.vocoder.decode(window)))
        config = transformer.config
        latents = {"LATENTS": torch.randn(1, config.out_channels, config.max_height, latent_frames(60.0))}
        calls.append(("dcae_60s", lambda: self.engines["dcae_decoder"].run(latents)))
        text = []
        for name, call in calls:
            for _ in range(3):
                call()
            sync(self.device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                sync(self.device)
            kernels = sorted(((e.key, e.self_device_time_total) for e in prof.key_averages()
                              if e.self_device_time_total > 0 and not e.key.startswith(("## ", "aten::"))),
                             key=lambda kv: -kv[1])
            total = sum(t for _, t in kernels)
            summary["tables"][name] = {"kernel_ms": total / 1e3, "top": [(k[:110], t / 1e3) for k, t in kernels[:25]]}
            text.append(f"== {name}: {total / 1e3:.2f} ms of kernels\n"
                        + "\n".join(f"{t / 1e3:8.3f} ms  {k[:150]}" for k, t in kernels[:60]))
            print(f"  {name}: {total / 1e3:.2f} ms of kernels; " + "; ".join(
                f"{k[:40]} {t / 1e3:.2f}" for k, t in kernels[:5]), flush=True)
        (self.out / "profile.txt").write_text("\n\n".join(text) + "\n")
        return summary

    # -- cross-attention kernels: which SDPA path the masks take
    def attention(self) -> dict:
        config = ACEStepTransformer.load_config(self.config_dir / TRANSFORMER_DIR)
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        rows_out = []
        for rows, frames in ((1, latent_frames(60.0)), (2, latent_frames(240.0))):
            for tokens in (503, 512):
                q = torch.randn(rows, heads, frames, head_dim, device=self.device, dtype=self.dtype)
                k = torch.randn(rows, heads, tokens, head_dim, device=self.device, dtype=self.dtype)
                v = torch.randn_like(k)
                valid = torch.ones(rows, tokens, device=self.device)
                valid[:, -7:] = 0
                masks = {"bool": valid[:, None, None, :] > 0, "none": None,
                         "additive": torch.zeros(rows, 1, 1, tokens, device=self.device, dtype=self.dtype)
                         .masked_fill(valid[:, None, None, :] == 0, float("-inf"))}
                for label, mask in masks.items():
                    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
                    timing = time_call(call, self.device, runs=20, warmup=3)
                    row = {"rows": rows, "frames": frames, "tokens": tokens, "mask": label,
                           "us": timing["median_s"] * 1e6}
                    rows_out.append(row)
                    print(f"  sdpa rows {rows} frames {frames} tokens {tokens} mask {label:>8}: {row['us']:8.1f} us",
                          flush=True)
        return {"rows": rows_out}

    # -- numerics: bf16 vs float32
    def numerics(self) -> dict:
        self.models = self.engines = self.pipe = None
        reset_memory(self.device)
        reference_models = build_models(self.config_dir, self.device)
        low_models = {k: copy.deepcopy(m).to(self.dtype) for k, m in reference_models.items()}
        variants = {
            "float32": make_engines(reference_models, self.config_dir, self.device, torch.float32),
            f"{self.args.dtype} eager": make_engines(low_models, self.config_dir, self.device, self.dtype),
        }
        if self.device.type == "cuda":
            accelerated = make_engines(copy.deepcopy(low_models), self.config_dir, self.device, self.dtype)
            accelerate_all(accelerated, self.settings())
            variants[f"{self.args.dtype} accelerated"] = accelerated
        self.models = low_models  # decode_inputs reads the config
        tokens = 1 + self.results["env"].get("prompt_tokens", 33) + self.results["env"].get("lyric_tokens", 400)
        decode_batch = self.decode_inputs(2, latent_frames(60.0), tokens)
        params = request(self.args.numerics_duration, 27)
        outputs = {}
        for name, engines in variants.items():
            # float32 products in float32 for the reference; TF32 for the rest, as upstream's GPU pipeline
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name != "float32"
            velocity = engines["dit_step"].run(decode_batch)["VELOCITY"].cpu()
            captured = {}
            dcae_run = engines["dcae_decoder"].run

            def spy(batch, dcae_run=dcae_run, captured=captured):
                captured["latents"] = batch["LATENTS"].float().cpu()
                return dcae_run(batch)

            runs = {name: engine.run for name, engine in engines.items()}
            runs["dcae_decoder"] = spy
            pipe = Text2MusicPipeline(HashPromptTokenizer(self.vocab_size),
                                      LyricTokenizer.from_file(Path(self.args.lyric_vocab)), runs, self.device)
            wave = torch.from_numpy(pipe(params).waveforms)
            outputs[name] = {"velocity": velocity, "latents": captured["latents"], "waveform": wave}
        self.models = self.engines = self.pipe = None  # a later section builds (and accelerates) its own
        self.accelerated = False
        reference = outputs.pop("float32")
        report = {"duration_s": params.audio_duration, "steps": params.infer_step,
                  "decode_shape": list(decode_batch["LATENTS"].shape), "bound": NUMERICS_BOUND, "errors": {}}
        for name, out in outputs.items():
            errors = {key: relative_error(out[key], reference[key]) for key in reference}
            report["errors"][name] = errors
            verdict = "within" if max(errors.values()) < NUMERICS_BOUND else "OVER"
            if verdict == "OVER":
                self.failures.append(f"numerics {name}: {max(errors.values()):.2e} >= {NUMERICS_BOUND:g}")
            print(f"  {name:>22} vs float32: " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items())
                  + f"  ({verdict} the {NUMERICS_BOUND:g} bound)", flush=True)
        return report


def relative_error(actual, reference) -> float:
    """||actual - reference|| / ||reference|| in float64, for tensors or arrays (pipeline waveforms are numpy)."""
    actual, reference = torch.as_tensor(actual).double(), torch.as_tensor(reference).double()
    return float((actual - reference).norm() / reference.norm())


def print_pipeline_row(label: str, row: dict) -> None:
    m = row["median"]
    print(f"  {label} {row['duration_s']:5.0f}s {row['steps']:3d} steps: total {m['total']:.3f} s "
          f"RTF {row['rtf']:6.1f}x | text {m['text_encoder'] * 1e3:.1f} cond {m['condition_encoder'] * 1e3:.1f} "
          f"diff {m['diffusion'] * 1e3:.1f} dcae {m['dcae_decoder'] * 1e3:.1f} voc {m['vocoder'] * 1e3:.1f} "
          f"pre {m['preprocess'] * 1e3:.1f} ms | peak {row.get('peak_allocated_gib', 0):.2f}/"
          f"{row.get('peak_reserved_gib', 0):.2f} GiB", flush=True)


def environment(args: argparse.Namespace) -> dict:
    import diffusers
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": args.commit, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "dtype": args.dtype, "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["triton"] = __import__("triton").__version__
    return env


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env.get('device', 'cpu')}; torch {env['torch']} (CUDA {env['cuda']}), "
             f"diffusers {env['diffusers']}, transformers {env['transformers']}; {env['dtype']}; "
             f"commit {env['commit']}; {env['date']}.", "",
             f"Command: `{env['command']}`", "",
             f"Tokens: prompt {env.get('prompt_tokens')}, lyrics {env.get('lyric_tokens')}.", ""]
    rows = []
    for label in ("eager", "pipeline"):
        section = results["sections"].get(label, {})
        for row in [section] if label == "eager" and "median" in section else section.get("rows", []):
            rows.append(("eager" if label == "eager" else "gpu profile", row))
    # (batching rows have their own table)
    if rows:
        lines += ["| pipeline | audio | steps | wall s | RTF | preprocess | text enc | cond enc | diffusion | DCAE | "
                  "vocoder | other | peak alloc / reserved GiB |", "|" + "---|" * 13]
        for label, row in rows:
            m = row["median"]
            lines.append(
                f"| {label} | {row['duration_s']:.0f} s | {row['steps']} | {m['total']:.3f} | {row['rtf']:.1f}x | "
                + " | ".join(f"{m[k] * 1e3:.1f} ms" for k in ("preprocess", "text_encoder", "condition_encoder",
                                                              "diffusion", "dcae_decoder", "vocoder", "outside_stages"))
                + f" | {row.get('peak_allocated_gib', 0):.2f} / {row.get('peak_reserved_gib', 0):.2f} |")
        lines.append("")
    if "load_and_warmup_s" in env:
        lines += [f"Cold start: models built {env['build_s']:.1f} s; accelerate + warm-up per component (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in env["accelerate_s"].items())
                  + f"; load + warm-up {env['load_and_warmup_s']:.1f} s.", ""]
        firsts = [r for r in results["sections"].get("pipeline", {}).get("rows", []) if "first_request_s" in r]
        if firsts:
            lines += ["| first request of a length | first s | steady s | ratio | FLOP floor of its decodes s |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['duration_s']:.0f} s / {r['steps']} | {r['first_request_s']:.3f} | "
                      f"{r['median']['total']:.3f} | {r['first_over_steady']:.2f}x | {r['floor_s']:.3f} |"
                      for r in firsts]
            lines.append("")
    batching = results["sections"].get("batching", {}).get("rows", [])
    if batching:
        lines += ["| items N | wall s | aggregate RTF | diffusion | DCAE | vocoder | text+cond enc | other | "
                  "decode FLOP floor s | peak alloc / reserved GiB |", "|" + "---|" * 10]
        for r in batching:
            m = r["median"]
            lines.append(f"| {r['items']} | {m['total']:.3f} | {r['rtf']:.1f}x | {m['diffusion'] * 1e3:.1f} ms | "
                         f"{m['dcae_decoder'] * 1e3:.1f} ms | {m['vocoder'] * 1e3:.1f} ms | "
                         f"{(m['text_encoder'] + m['condition_encoder']) * 1e3:.1f} ms | "
                         f"{(m['preprocess'] + m['outside_stages']) * 1e3:.1f} ms | {r['floor_s']:.3f} | "
                         f"{r.get('peak_allocated_gib', 0):.2f} / {r.get('peak_reserved_gib', 0):.2f} |")
        lines.append("")
    equality = results["sections"].get("equality", {})
    if "errors" in equality:
        lines += [f"Batched vs solo ({equality['items']} items): relative L2 of each item's waveform against its "
                  f"solo run: " + ", ".join(f"{e:.2e}" for e in equality["errors"])
                  + f" (bound {equality['bound']:g}).", ""]
    vocoder_batch = results["sections"].get("vocoder_batch", {}).get("rows", [])
    if vocoder_batch:
        lines += ["| vocoder windows per call | items x audio | ms | first call s |", "|---|---|---|---|"]
        lines += [f"| {r['window_batch']} | {r['items']} x {r['audio_s']:.0f} s | {r['ms']:.1f} | "
                  f"{r['first_call_s']:.1f} |" for r in vocoder_batch]
        lines.append("")
    decode = results["sections"].get("decode", {}).get("rows", [])
    if decode:
        lines += ["| decode variant | audio | rows | frames | tokens | ms | TFLOP | TFLOP/s |", "|" + "---|" * 8]
        lines += [f"| {r['variant']} | {r['audio_s']:.0f} s | {r['rows']} | {r['frames']} | {r['tokens']} | "
                  f"{r['ms']:.2f} | {r['tflop']:.2f} | {r['tflops_per_s']:.0f} |" for r in decode]
        lines.append("")
    decoders = results["sections"].get("decoders", {}).get("rows", [])
    if decoders:
        lines += ["| stage | variant | audio | ms | first call ms | peak alloc GiB |", "|" + "---|" * 6]
        lines += [f"| {r['stage']} | {r['variant']} | {r['audio_s']:.0f} s | {r['ms']:.1f} | "
                  f"{r['first_call_s'] * 1e3:.0f} | {r.get('peak_allocated_gib', 0):.2f} |" for r in decoders]
        lines.append("")
    numerics = results["sections"].get("numerics", {})
    if "errors" in numerics:
        lines += [f"Numerics ({numerics['duration_s']:.0f} s, {numerics['steps']} steps; decode "
                  f"{numerics['decode_shape']}): relative L2 error against float32 (TF32 off); "
                  f"bound {numerics.get('bound', NUMERICS_BOUND):g}.", "",
                  "| variant | one decode | final latents | waveform |", "|---|---|---|---|"]
        lines += [f"| {name} | {e['velocity']:.2e} | {e['latents']:.2e} | {e['waveform']:.2e} |"
                  for name, e in numerics["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--configs", default="60:27,60:60,240:27,240:60",
                        help="comma list of seconds:steps for the pipeline section")
    parser.add_argument("--sections", default="pipeline,batching,equality,numerics")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per pipeline config (median)")
    parser.add_argument("--eager-runs", type=int, default=2)
    parser.add_argument("--eager-config", default="60:27", help="seconds:steps of the eager section")
    parser.add_argument("--decode-runs", type=int, default=10)
    parser.add_argument("--decoder-runs", type=int, default=3)
    parser.add_argument("--vocoder-window", type=int, default=Acceleration().vocoder_window_frames or 0,
                        help="vocoder window in mel frames for the gpu profile; 0 decodes whole")
    parser.add_argument("--vocoder-window-batch", type=int, default=Acceleration().vocoder_window_batch,
                        help="vocoder windows (all items and channels together) per graph call")
    parser.add_argument("--fused-linear-attention", action="store_true",
                        help="the gpu profile with the Triton linear-attention kernel (off by default)")
    parser.add_argument("--batching-config", default="60:27", help="seconds:steps of the batching section")
    parser.add_argument("--batching-items", default="1,2,4,8,16")
    parser.add_argument("--batching-runs", type=int, default=2)
    parser.add_argument("--equality-items", type=int, default=4)
    parser.add_argument("--numerics-duration", type=float, default=20.0)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip sections started after this")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--config-dir", default=str(FULL_SIZE_CONFIGS))
    parser.add_argument("--lyric-vocab", default=str(DEFAULT_LYRIC_VOCAB))
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)

    bench = Bench(args)
    print("ENV", json.dumps(bench.results["env"]), flush=True)
    for name in args.sections.split(","):
        bench.section(name, getattr(bench, name))
    (bench.out / "results.md").write_text(markdown(bench.results))
    print(f"DONE in {bench.elapsed():.0f} s\n")
    print(markdown(bench.results))
    errors = [f"{name}: {section['error']}" for name, section in bench.results["sections"].items()
              if "error" in section]
    if bench.failures or errors:
        sys.exit("FAILED: " + "; ".join(bench.failures + errors))


if __name__ == "__main__":
    main()
