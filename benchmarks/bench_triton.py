"""Serving speed through Triton (gpu profile) on a full-size random checkpoint, against in-process.

    python -m benchmarks.bench_triton --out DIR [--work DIR] [--duration 60] [--steps 27]
        [--concurrency 1,2,4,8,16] [--requests-per-worker 3]

1. Writes a full-size random checkpoint in the published layout (bf16 safetensors, seeded init
   from benchmarks/full_size_configs/; a small trained prompt tokenizer, since the UMT5 one cannot
   be downloaded; the lyric vocabulary from --lyric-vocab) unless --work already holds one.
2. In-process: Text2MusicPipeline.from_checkpoint(..., accelerate=True) on that checkpoint, one
   request repeated (median of --runs after a warm-up): the reference latency. Then freed.
3. Builds the gpu-profile model repository (export.build_repository) and starts tritonserver on it.
4. Single request through the `acestep` ensemble over gRPC (tritonclient.grpc.aio, the client the
   gateway uses): median latency, and Triton's overhead over in-process.
5. Throughput: for each concurrency c, c workers each send --requests-per-worker requests back to
   back (after one untimed round, which captures the graphs of new batch shapes): audio seconds per
   wall second, request latency percentiles, and the GPU memory all server processes hold (nvidia-smi).
Prints a short table last; writes triton_results.json and triton_results.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from acestep_triton.checkpoint import (
    DCAE_DIR,
    LYRIC_VOCAB_FILENAME,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VOCODER_DIR,
    validate_checkpoint,
)
from acestep_triton.contract import ENSEMBLE_NAME, STAGES, GenerationParams
from acestep_triton.ensemble_client import infer_inputs, read_result
from benchmarks.bench_pipeline import (
    DEFAULT_LYRIC_VOCAB,
    FULL_SIZE_CONFIGS,
    LYRICS,
    PROMPT,
    REQUEST_SEED,
    build_models,
    environment,
)

PROMPT_TOKENIZER_VOCAB = 256


def write_checkpoint(root: Path, lyric_vocab: Path) -> Path:
    """A full-size random checkpoint in the published layout (bf16 weights), built once."""
    from acestep_triton.tiny import _train_text_tokenizer

    if root.exists():
        return validate_checkpoint(root).root
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    models = build_models(FULL_SIZE_CONFIGS, torch.device("cuda"), prune=False)
    folders = {"transformer": TRANSFORMER_DIR, "umt5": TEXT_ENCODER_DIR, "dcae": DCAE_DIR, "vocoder": VOCODER_DIR}
    for key, folder in folders.items():
        models[key].to(torch.bfloat16).save_pretrained(staging / folder)
        models[key] = None
    _train_text_tokenizer(staging / TEXT_ENCODER_DIR, vocab_size=PROMPT_TOKENIZER_VOCAB)
    shutil.copy(lyric_vocab, staging / LYRIC_VOCAB_FILENAME)
    validate_checkpoint(staging)
    staging.rename(root)
    torch.cuda.empty_cache()
    return root


def in_process_latency(checkpoint: Path, params: GenerationParams, runs: int) -> dict:
    """Median wall seconds of the accelerated in-process pipeline on `checkpoint` (after a warm-up)."""
    from acestep_triton.pipeline import Text2MusicPipeline

    start = time.perf_counter()
    pipe = Text2MusicPipeline.from_checkpoint(checkpoint, device="cuda", dtype=torch.bfloat16, accelerate=True)
    load_s = time.perf_counter() - start
    pipe(params)
    torch.cuda.reset_peak_memory_stats()
    totals, stages = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = pipe(params)
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - start)
        stages.append(result.timings)
    out = {"load_s": load_s, "median_s": statistics.median(totals), "runs": totals,
           "stages": {k: statistics.median(s[k] for s in stages) for k in stages[0]},
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    del pipe, result
    torch.cuda.empty_cache()
    return out


def gpu_memory_used_mib() -> int:
    """GPU memory held by every process but this one (the server's model instances), per nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    return sum(int(used) for pid, used in rows if int(pid) != os.getpid())


class MemoryPeak:
    """Samples nvidia-smi every `period_s` in a thread; `peak_mib` is the largest reading."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s, self.peak_mib, self._stop = period_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, gpu_memory_used_mib())
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def one_request(client, params: GenerationParams) -> dict:
    import tritonclient.grpc.aio as grpcclient

    inputs = infer_inputs(grpcclient, params)
    start = time.perf_counter()
    result = read_result(await client.infer(ENSEMBLE_NAME, inputs, client_timeout=600))
    latency = time.perf_counter() - start
    return {"latency_s": latency, "audio_s": result.duration, "samples": int(result.waveforms.shape[-1]),
            "stages": result.timings}


async def load_level(url: str, params: GenerationParams, concurrency: int, per_worker: int) -> dict:
    """`concurrency` workers, `per_worker` back-to-back requests each, after one untimed round."""
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    options = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
               ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE)]
    client = grpcclient.InferenceServerClient(url, channel_args=options)
    try:
        await asyncio.gather(*(one_request(client, params) for _ in range(concurrency)))

        async def worker() -> list[dict]:
            return [await one_request(client, params) for _ in range(per_worker)]

        with MemoryPeak() as memory:
            start = time.perf_counter()
            done = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
            wall = time.perf_counter() - start
    finally:
        await client.close()
    latencies = sorted(r["latency_s"] for r in done)
    audio = sum(r["audio_s"] for r in done)
    return {"concurrency": concurrency, "requests": len(done), "wall_s": wall, "audio_s": audio,
            "audio_s_per_s": audio / wall, "latency_p50_s": statistics.median(latencies),
            "latency_max_s": latencies[-1], "gpu_memory_peak_mib": memory.peak_mib,
            "stages_median_s": {s: statistics.median(r["stages"][s] for r in done) for s in STAGES}}


def markdown(results: dict) -> str:
    env, single = results["env"], results.get("single", {})
    lines = [f"Device: {env.get('device')}; torch {env['torch']}; tritonserver from nvidia-pytriton 0.7.0 "
             f"(server 2.51); gpu profile; commit {env['commit']}; {env['date']}.", "",
             f"Command: `{env['command']}`", "",
             f"Request: {results['duration_s']:.0f} s audio, {results['steps']} steps, contract defaults.", ""]
    inproc = results.get("in_process", {})
    if "median_s" in inproc and "median_s" in single:
        overhead = single["median_s"] / inproc["median_s"] - 1
        lines += ["| path | median wall s | RTF |", "|---|---|---|",
                  f"| in-process (same checkpoint) | {inproc['median_s']:.3f} | "
                  f"{results['duration_s'] / inproc['median_s']:.1f}x |",
                  f"| Triton gRPC, one request | {single['median_s']:.3f} | "
                  f"{results['duration_s'] / single['median_s']:.1f}x |", "",
                  f"Triton overhead over in-process: {overhead * 100:+.1f} %.", ""]
    levels = results.get("levels", [])
    if levels:
        lines += ["| concurrency | requests | wall s | audio s / wall s | p50 latency s | max latency s | "
                  "GPU memory peak GiB (all processes) |", "|" + "---|" * 7]
        lines += [f"| {r['concurrency']} | {r['requests']} | {r['wall_s']:.2f} | {r['audio_s_per_s']:.1f} | "
                  f"{r['latency_p50_s']:.2f} | {r['latency_max_s']:.2f} | {r['gpu_memory_peak_mib'] / 1024:.1f} |"
                  for r in levels]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--work", default="/tmp/acestep-bench", help="checkpoint and model repository go here")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--runs", type=int, default=5, help="single-request runs (median)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests-per-worker", type=int, default=3)
    parser.add_argument("--lyric-vocab", default=str(DEFAULT_LYRIC_VOCAB))
    parser.add_argument("--startup-timeout-s", type=float, default=420.0)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    from acestep_triton.tritonserver import TritonServer
    from export.build_repository import build_repository

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    params = GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=args.duration, infer_step=args.steps,
                              actual_seeds=(REQUEST_SEED,))
    results: dict = {"env": environment(args), "duration_s": args.duration, "steps": args.steps}

    def save() -> None:
        (out / "triton_results.json").write_text(json.dumps(results, indent=1, default=str))

    start = time.perf_counter()
    checkpoint = write_checkpoint(work / "checkpoint", Path(args.lyric_vocab))
    results["checkpoint_s"] = time.perf_counter() - start
    print(f"checkpoint ready in {results['checkpoint_s']:.0f} s", flush=True)
    results["in_process"] = in_process_latency(checkpoint, params, args.runs)
    print(f"in-process: {results['in_process']['median_s']:.3f} s (load {results['in_process']['load_s']:.0f} s)",
          flush=True)
    save()

    repository = build_repository("gpu", checkpoint, work / "repository")
    server = TritonServer(repository, log_path=out / "tritonserver.log", startup_timeout_s=args.startup_timeout_s,
                          env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    start = time.perf_counter()
    with server:
        results["server_start_s"] = time.perf_counter() - start
        results["server_idle_gpu_memory_mib"] = gpu_memory_used_mib()
        print(f"tritonserver ready in {results['server_start_s']:.0f} s, "
              f"{results['server_idle_gpu_memory_mib'] / 1024:.1f} GiB on the GPU", flush=True)
        single = asyncio.run(load_level(server.grpc_url, params, 1, args.runs))
        results["single"] = {"median_s": single["latency_p50_s"], "stages_median_s": single["stages_median_s"]}
        print(f"triton single request: {single['latency_p50_s']:.3f} s; stages "
              + json.dumps({k: round(v, 3) for k, v in single["stages_median_s"].items()}), flush=True)
        save()
        results["levels"] = []
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            level = asyncio.run(load_level(server.grpc_url, params, concurrency, args.requests_per_worker))
            results["levels"].append(level)
            print(f"concurrency {concurrency:2d}: {level['audio_s_per_s']:6.1f} audio s / s, p50 "
                  f"{level['latency_p50_s']:.2f} s, GPU {level['gpu_memory_peak_mib'] / 1024:.1f} GiB", flush=True)
            save()
    save()
    (out / "triton_results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
