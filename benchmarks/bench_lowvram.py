"""The lowvram profile served by Triton: GPU memory of every server process and speed at 60 s and 240 s.

    python3 -m benchmarks.bench_lowvram --out DIR [--work DIR] [--checkpoint DIR] [--durations 60,240]
        [--steps 27] [--runs 2] [--set FIELD=VALUE ...] [--budget-gib 8] [--sample-ms 10] [--no-reference]

Sections, in order; each one's numbers land in lowvram_results.json as it finishes:
  checkpoint  full-size random weights in the published layout (benchmarks.bench_triton.write_checkpoint),
              unless --checkpoint names one
  reference   the in-process pipeline (the profile's device and dtype, no speed-ups) once per duration:
              the waveform Triton's must match (relative L2 <= --max-rel-l2, bf16's bound)
  server      the lowvram repository (export.build_repository, --set overrides its settings) served by
              tritonserver with the profile's options and environment; ready time; GPU memory per process
              (NVML) once loaded and idle
  per duration  one untimed request, then --runs timed ones over gRPC, one at a time: median latency,
              real-time factor, stage times; NVML sampled every --sample-ms over all of them: the largest
              sum over the server's processes (the budget's measure), each process's own largest value,
              and the sample at the largest sum, per process
Prints a table last; writes lowvram_results.json and lowvram_results.md into --out. Exit status 1 when
the memory budget or the correctness check fails, 2 when a section raised (its error is in the results).
On the CPU (`--set device=cpu --set dtype=float32 --checkpoint <tiny>`) it runs the same path without
NVML: a smoke test of the command.

The GPU components release their allocator cache after every execution, so dit_step's working memory
exists only while a step runs (tens of ms): sampling needs to be that fine to see it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.contract import STAGES, GenerationParams
from benchmarks.bench_pipeline import DEFAULT_LYRIC_VOCAB, LYRICS, PROMPT, REQUEST_SEED, environment
from benchmarks.bench_triton import MAX_REL_L2, Run, ServerMemory, correctness, parse_settings, single, write_checkpoint

PROFILE = "lowvram"


class MemoryTrace:
    """Samples a ServerMemory every `period_s` in a thread while inside: the sample with the largest sum,
    and each process's largest value (labels from bench_triton.process_label)."""

    def __init__(self, memory: ServerMemory, period_s: float) -> None:
        self.memory, self.period_s = memory, period_s
        self.peak: dict = {"mib": 0.0, "per_process": {}}
        self.per_process: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.memory.sample()
            self.samples += 1
            if sample["mib"] > self.peak["mib"]:
                self.peak = sample
            for label, mib in sample["per_process"].items():
                self.per_process[label] = max(mib, self.per_process.get(label, 0.0))
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"peak_sum_mib": self.peak["mib"], "at_peak_mib": self.peak["per_process"],
                "per_process_peak_mib": self.per_process, "samples": self.samples}


def params_for(duration: float, steps: int) -> GenerationParams:
    return GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=duration, infer_step=steps,
                            actual_seeds=(REQUEST_SEED,))


def references(checkpoint: Path, lyric_vocab: Path, profile, durations: list[float],
               steps: int) -> dict[float, np.ndarray]:
    """The in-process pipeline's waveform per duration, on the profile's device and dtype without
    speed-ups (eager), loaded once and freed before the server starts."""
    from acestep_triton.pipeline import Text2MusicPipeline

    pipe = Text2MusicPipeline.from_checkpoint(checkpoint, lyric_vocab, device=profile.device,
                                              dtype=getattr(torch, profile.dtype))
    waves = {d: pipe(params_for(d, steps)).waveforms for d in durations}
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return waves


def nvml(pid: int) -> ServerMemory | None:
    """NVML over the server's process group, or None where there is no NVML (the CPU smoke run)."""
    try:
        return ServerMemory(pid)
    except Exception as exc:  # pynvml missing, or no driver
        print(f"no GPU memory measurement: {type(exc).__name__}: {exc}", flush=True)
        return None


def measure_duration(url: str, memory: ServerMemory | None, duration: float, args,
                     reference: np.ndarray | None) -> dict:
    """One duration's section: timed requests with NVML traced over them, checked against `reference`."""
    params = params_for(duration, args.steps)
    trace = MemoryTrace(memory, args.sample_ms / 1000) if memory is not None else None
    if trace is not None:
        trace.__enter__()
    try:
        timing, wave = asyncio.run(single(url, params, args.runs))
    finally:
        if trace is not None:
            trace.__exit__()
    out = {"duration_s": duration, "steps": args.steps, "rtf": duration / timing["median_s"], **timing}
    if trace is not None:
        out["gpu_memory"] = trace.summary()
        out["gpu_memory"]["within_budget"] = trace.peak["mib"] < args.budget_gib * 1024
    if reference is not None:
        out["correctness"] = correctness(wave, reference, args.max_rel_l2)
    memory_text = (f"peak {out['gpu_memory']['peak_sum_mib'] / 1024:.2f} GiB over all processes"
                   if trace is not None else "no NVML")
    print(f"{duration:.0f} s: {timing['median_s']:.3f} s ({out['rtf']:.1f}x), {memory_text}", flush=True)
    return out


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env.get('device', 'cpu')}; torch {env['torch']}; tritonserver from nvidia-pytriton 0.7.0; "
             f"lowvram profile, settings {json.dumps(results['settings'])}; commit {env['commit']}; {env['date']}.",
             "", f"Command: `{env['command']}`", "",
             f"Request: contract defaults, {results['steps']} steps, seed {REQUEST_SEED}; {results['runs']} timed runs "
             f"after one untimed. Budget: {results['budget_gib']:g} GiB summed over the server's processes (NVML, "
             f"sampled every {results['sample_ms']:g} ms).", ""]
    server = results.get("server", {})
    if "ready_s" in server:
        lines += [f"Server ready in {server['ready_s']:.0f} s.", ""]
    rows = [d for d in results.get("durations", []) if "median_s" in d]
    if rows:
        lines += ["| audio s | median s | RTF | peak GiB, all processes | within budget | rel L2 vs in-process |",
                  "|---|---|---|---|---|---|"]
        for d in rows:
            memory = d.get("gpu_memory", {})
            peak = f"{memory['peak_sum_mib'] / 1024:.2f}" if memory else "n/a"
            within = ("yes" if memory.get("within_budget") else "**no**") if memory else "n/a"
            check = d.get("correctness", {})
            error = f"{check['rel_l2']:.2e}" if "rel_l2" in check else "n/a"
            lines.append(f"| {d['duration_s']:.0f} | {d['median_s']:.3f} | {d['rtf']:.1f}x | {peak} | {within} "
                         f"| {error} |")
        lines += ["", "| audio s | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
        for d in rows:
            lines.append(f"| {d['duration_s']:.0f} | "
                         + " | ".join(f"{d['stages_median_s'][s] * 1e3:.0f} ms" for s in STAGES) + " |")
        lines.append("")
    idle = server.get("idle_memory", {}).get("per_process", {})
    labels = sorted(set(idle) | {k for d in rows for k in d.get("gpu_memory", {}).get("per_process_peak_mib", {})})
    if labels:
        header = ["process", "idle MiB"] + [f"{d['duration_s']:.0f} s: peak MiB / at the sum's peak" for d in rows]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label in labels:
            cells = [label, f"{idle.get(label, 0):.0f}"]
            for d in rows:
                memory = d.get("gpu_memory", {})
                cells.append(f"{memory.get('per_process_peak_mib', {}).get(label, 0):.0f} / "
                             f"{memory.get('at_peak_mib', {}).get(label, 0):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/acestep-bench", help="checkpoint and model repository go here")
    parser.add_argument("--server-python", type=Path, default=None,
                        help="interpreter whose packages the server's python models import (default: "
                             "$ACESTEP_SERVER_PYTHON, else this one)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="serve this checkpoint instead of the full-size random one written into --work")
    parser.add_argument("--durations", default="60,240")
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a lowvram-profile setting (export.build_repository.Profile), e.g. device=cpu")
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the in-process waveform check")
    parser.add_argument("--max-rel-l2", type=float, default=MAX_REL_L2)
    parser.add_argument("--lyric-vocab", default=str(DEFAULT_LYRIC_VOCAB))
    parser.add_argument("--startup-timeout-s", type=float, default=420.0)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)

    from acestep_triton.tritonserver import TritonServer
    from export.build_repository import build_repository, profile_environment, resolve_profile, server_arguments

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    overrides = parse_settings(args.set, PROFILE)
    profile = resolve_profile(PROFILE, overrides)
    args.dtype = profile.dtype
    durations = [float(d) for d in args.durations.split(",") if d]
    results: dict = {"env": environment(args), "settings": overrides, "steps": args.steps, "runs": args.runs,
                     "budget_gib": args.budget_gib, "sample_ms": args.sample_ms, "durations": []}
    sections = Run(out, results, budget_s=float("inf"), file_name="lowvram_results.json")
    lyric_vocab = Path(args.lyric_vocab)

    start = time.perf_counter()
    checkpoint = (validate_checkpoint(args.checkpoint).root if args.checkpoint
                  else write_checkpoint(work / "checkpoint", lyric_vocab))
    results["checkpoint_s"] = time.perf_counter() - start
    print(f"checkpoint ready in {results['checkpoint_s']:.0f} s", flush=True)
    waves: dict[float, np.ndarray] = {}

    def reference_section() -> dict:
        waves.update(references(checkpoint, lyric_vocab, profile, durations, args.steps))
        return {"durations": sorted(waves)}

    if not args.no_reference:
        sections.section("reference", reference_section, required=True)

    repository = build_repository(PROFILE, checkpoint, work / "repository-lowvram", lyric_vocab, overrides=overrides)
    gpus = torch.cuda.device_count() if profile.device == "cuda" else 0
    python = args.server_python or Path(os.environ.get("ACESTEP_SERVER_PYTHON", sys.executable))
    server = TritonServer(repository, log_path=out / "tritonserver-lowvram.log",
                          startup_timeout_s=args.startup_timeout_s, env=profile_environment(profile), python=python,
                          extra_args=server_arguments(profile, gpus))
    results["server"] = {"arguments": server.extra_args, "environment": profile_environment(profile)}
    start = time.perf_counter()
    with server:
        results["server"]["ready_s"] = time.perf_counter() - start
        print(f"tritonserver ready in {results['server']['ready_s']:.0f} s", flush=True)
        memory = nvml(server.process.pid)
        if memory is not None:
            results["server"]["idle_memory"] = memory.sample()
        for duration in durations:
            row = sections.section(f"duration_{duration:g}", lambda d=duration: measure_duration(
                server.grpc_url, memory, d, args, waves.get(d)), {}, required=True)
            if row is not None:
                results["durations"].append(row)
    sections.save()
    text = markdown(results)
    (out / "lowvram_results.md").write_text(text)
    print(text)
    over = [d["duration_s"] for d in results["durations"] if d.get("gpu_memory", {}).get("within_budget") is False]
    wrong = [d["duration_s"] for d in results["durations"] if d.get("correctness", {}).get("passed") is False]
    if over or wrong:
        print(f"FAIL: over the {args.budget_gib:g} GiB budget at {over or 'no duration'}; waveform off the "
              f"in-process one at {wrong or 'no duration'}", flush=True)
        return 1
    if sections.errors:
        print(f"sections with errors: {sections.errors} (see lowvram_results.json)", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
