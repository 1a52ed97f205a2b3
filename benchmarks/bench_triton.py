"""Serving speed through Triton (gpu profile) on a full-size random checkpoint, against in-process: one command.

    python3 -m benchmarks.bench_triton --out DIR --server-python /tmp/stubenv/bin/python3 \
        [--work DIR] [--duration 60] [--steps 27] [--runs 5] [--gateway-runs 3] [--tasks-runs 0] \
        [--concurrency 1,2,4,8,16] [--requests-per-worker 2] [--set FIELD=VALUE ...] \
        [--variant FIELD=VALUE[,FIELD=VALUE] ...] [--perf-analyzer-concurrency 4] [--budget-s 420]

--server-python (or ACESTEP_SERVER_PYTHON) is the interpreter whose packages the server's python
models import (acestep_triton.tritonserver.stub_environment layers this checkout over it). On the
GPU machine that is a numpy-1 environment: nvidia-pytriton's stub is built for numpy 1 (issue
"Served speed" has the recipe: a `python3 -m venv --without-pip` whose site-packages links the
image's packages, numpy 1.26.4 in place of numpy 2).

Sections, in order; each one's numbers land in triton_results.json as it finishes:
  checkpoint   a full-size random checkpoint in the published layout (bf16 safetensors, seeded init from
               benchmarks/full_size_configs/, a small trained prompt tokenizer, the lyric vocabulary from
               --lyric-vocab), written once into --work
  in_process   (unless --no-in-process) Text2MusicPipeline (gpu profile speed-ups) on that checkpoint, one request repeated: median
               wall time up to the waveform in host memory, after a warm-up; its waveform is the reference
  triton       the gpu-profile repository (export.build_repository, --set overrides its settings) served
               by tritonserver; one request over gRPC (tritonclient.grpc.aio, as the gateway): median of
               --runs, overhead over in-process, per-stage TIME outputs
  correctness  the same seed through Triton and in-process: relative L2 of the waveform; over
               --max-rel-l2 (1e-2, the bf16 bound) the benchmark FAILS (exit status 1)
  tasks        with --tasks-runs N: retake, repaint, extend, edit and audio2audio (bench_triton.task_requests),
               each giving a result as long as --duration, the audio-input ones starting from the single
               request's waveform; median of N after a warm-up
  gateway      `python -m gateway` in front of that server: POST /generate (REST, WAV bytes back, file
               written by the gateway), median of --gateway-runs, overhead over Triton
  concurrency  for each level c, c workers send --requests-per-worker requests back to back (after one
               untimed round): audio seconds per wall second, p50/p99 latency, and the GPU memory of
               all server processes (NVML, sampled every 0.25 s; peak, and each process's part at it)
  phases       where a step's time goes: the server's models log each call's phases
               (acestep_triton.triton_python.PhaseLog, $ACESTEP_PHASE_LOG); medians per call of `dit_step`
               (inputs, run, gpu, respond) and of the loop's steps (loop, send, bls, receive), over the
               single-request runs and over the highest concurrency level
  stats        Triton's /v2/models/stats per model: rows per execution, queue / input / infer / output
               milliseconds per request (cumulative over everything above)
  perf_analyzer  against `acestep` and `dit_step`, when the binary and its libraries (libb64, libcudart)
               are there; otherwise a "skipped: why" line
  variant      per --variant: another repository with those settings; single request, correctness,
               one concurrency level (--variant-concurrency) with memory
Sections past --budget-s seconds (all but in_process, the single request, correctness and stats) are
skipped and say so, so that one run fits a 10-minute device call. --profile cpu --checkpoint DIR runs the
same on the CPU (a smoke test on the tiny checkpoint; no NVML there).
Prints a table last; writes triton_results.json and triton_results.md into --out. Exit status 1
when the correctness check fails, 2 when a section raised (its error is in the results).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from email.message import Message
from pathlib import Path

import numpy as np
import torch

from acestep_triton.checkpoint import (
    DCAE_DIR,
    LYRIC_VOCAB_FILENAME,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VOCODER_DIR,
    validate_checkpoint,
)
from acestep_triton.contract import (
    AUDIO2AUDIO,
    AUDIO_INPUT_TASKS,
    EDIT,
    ENSEMBLE_NAME,
    EXTEND,
    OUTPUT_SAMPLE_RATE,
    REPAINT,
    RETAKE,
    STAGES,
    GenerationParams,
    SourceAudio,
)
from acestep_triton.ensemble_client import infer_inputs, read_result
from acestep_triton.phase_log import PHASE_LOG_ENV
from benchmarks.bench_pipeline import (
    DEFAULT_LYRIC_VOCAB,
    FULL_SIZE_CONFIGS,
    LYRICS,
    PROMPT,
    REQUEST_SEED,
    build_models,
    environment,
    relative_error,
)

PROMPT_TOKENIZER_VOCAB = 256
# Relative L2 of the waveform, Triton against in-process, same seed, bf16 (issue "Served speed").
MAX_REL_L2 = 1e-2
SERVER_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


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


def in_process(checkpoint: Path, lyric_vocab: Path, params: GenerationParams, runs: int,
               profile) -> tuple[dict, np.ndarray]:
    """Median wall seconds of the in-process pipeline as `profile` runs it (device, dtype, speed-ups)
    up to the waveform in host memory (the pipeline returns it on the CPU), after a warm-up; and
    that waveform [B, 2, N]."""
    from acestep_triton.pipeline import Text2MusicPipeline

    cuda = profile.device == "cuda"
    start = time.perf_counter()
    pipe = Text2MusicPipeline.from_checkpoint(checkpoint, lyric_vocab, device=profile.device,
                                              dtype=getattr(torch, profile.dtype), accelerate=profile.accelerate)
    load_s = time.perf_counter() - start
    pipe(params)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    totals, stages = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = pipe(params)
        totals.append(time.perf_counter() - start)
        stages.append(result.timings)
    out = {"load_s": load_s, "median_s": statistics.median(totals), "runs_s": totals,
           "stages_median_s": {k: statistics.median(s[k] for s in stages) for k in stages[0]}}
    if cuda:
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    wave = result.waveforms
    del pipe, result
    if cuda:
        torch.cuda.empty_cache()
    return out, wave


# ----------------------------------------------------------------------------- GPU memory (NVML)


class ServerMemory:
    """GPU memory of the server's processes (its process group) per NVML, summed over devices.

    When NVML reports none of the group's pids (a PID namespace in a container hides them), every
    process but this one is counted instead, and `pid_match` says so. The group is scanned again
    only when NVML reports a pid it has not seen, so sampling every few ms stays cheap.
    """

    def __init__(self, pgid: int) -> None:
        import pynvml

        self.nvml, self.pgid = pynvml, pgid
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.seen: set[int] = set()
        self.group: set[int] = set()
        self.labels: dict[int, tuple[str, str]] = {}

    def sample(self) -> dict:
        """MiB summed over the server's processes, their count, and MiB per model and per process
        (`process_label`)."""
        from acestep_triton.tritonserver import process_group_pids

        used: dict[int, int] = {}
        for handle in self.handles:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        if not self.seen.issuperset(used):
            self.group = set(process_group_pids(self.pgid))
            self.seen |= set(used)
        mine = {pid: b for pid, b in used.items() if pid in self.group}
        pid_match = bool(mine)
        counted = mine if pid_match else {pid: b for pid, b in used.items() if pid != os.getpid()}
        labels = {pid: self.labels.setdefault(pid, process_label(pid)) for pid in counted}
        per_model: dict[str, float] = {}
        for pid, used_bytes in counted.items():
            model = labels[pid][0]
            per_model[model] = per_model.get(model, 0.0) + used_bytes / 2**20
        return {"mib": sum(counted.values()) / 2**20, "processes": len(counted), "pid_match": pid_match,
                "mib_per_model": per_model,
                "per_process": {labels[pid][1]: b / 2**20 for pid, b in counted.items()}}


def process_label(pid: int) -> tuple[str, str]:
    """(model, process) for a server process: a python-backend stub's model (its model.py's folder) and
    model instance (`dit_step_0_0`: the stub is started as `triton_python_backend_stub MODEL_PATH ...
    INSTANCE_NAME RUNTIME_DIR`); for another program its name, and in the process label its pid too
    (tritonserver's excepted)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}", f"pid {pid}"
    program = Path(argv[0]).name
    if program == "triton_python_backend_stub" and len(argv) > 8:
        return Path(argv[1]).parents[1].name, argv[8]
    return program, f"{program} ({pid})" if program != "tritonserver" else program


class MemoryPeak:
    """Samples `memory` every `period_s` in a thread; `peak` is the sample with the most MiB."""

    def __init__(self, memory: ServerMemory, period_s: float = 0.25) -> None:
        self.memory, self.period_s = memory, period_s
        self.peak = {"mib": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.memory.sample()
            if sample["mib"] > self.peak["mib"]:
                self.peak = sample
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- phases


def phase_summary(folder: Path, since: float, until: float) -> dict:
    """Per model, the median milliseconds of each phase per call over the calls logged (PhaseLog) in
    [since, until] (wall clock), the calls counted and their median rows."""
    calls: dict[str, list[dict]] = {}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if since <= entry["t"] <= until:
                calls.setdefault(entry.pop("model"), []).append(entry)
    summary = {}
    for model, entries in calls.items():
        phases = list(dict.fromkeys(k for e in entries for k, v in e.items() if isinstance(v, float) and k != "t"))
        summary[model] = {"calls": len(entries),
                          "rows_median": statistics.median(e.get("rows", 0) for e in entries),
                          "ms_median": {p: statistics.median(e.get(p, 0.0) for e in entries) for p in phases},
                          "ms_mean": {p: statistics.fmean(e.get(p, 0.0) for e in entries) for p in phases}}
    return summary


def phase_text(summary: dict) -> str:
    return "; ".join(f"{model} ({s['calls']} calls, {s['rows_median']:g} rows): "
                     + ", ".join(f"{p} {v:.2f}" for p, v in s["ms_median"].items()) + " ms"
                     for model, s in sorted(summary.items()))


# ----------------------------------------------------------------------------- Triton clients


def grpc_client(url: str):
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    options = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
               ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE)]
    return grpcclient.InferenceServerClient(url, channel_args=options)


async def one_request(client, params: GenerationParams, keep_wave: bool = False,
                      source: SourceAudio | None = None) -> dict:
    """One `acestep` request through the shared ensemble client: latency, audio seconds, stage times."""
    import tritonclient.grpc.aio as grpcclient

    inputs = infer_inputs(grpcclient, params, source=source)
    start = time.perf_counter()
    result = read_result(await client.infer(ENSEMBLE_NAME, inputs, client_timeout=600))
    latency = time.perf_counter() - start
    out = {"latency_s": latency, "audio_s": result.duration, "samples": int(result.waveforms.shape[-1]),
           "stages": result.timings}
    if keep_wave:
        out["wave"] = result.waveforms
    return out


async def single(url: str, params: GenerationParams, runs: int) -> tuple[dict, np.ndarray]:
    """One request at a time: a warm-up, then `runs` timed; median latency, stages, the last waveform."""
    client = grpc_client(url)
    try:
        await one_request(client, params)
        done = [await one_request(client, params, keep_wave=True) for _ in range(runs)]
    finally:
        await client.close()
    latencies = [r["latency_s"] for r in done]
    return ({"median_s": statistics.median(latencies), "runs_s": latencies,
             "stages_median_s": {s: statistics.median(r["stages"][s] for r in done) for s in STAGES}},
            done[-1]["wave"])


def task_requests(params: GenerationParams) -> dict[str, GenerationParams]:
    """Each task other than text2music, shaped so that its result is `params.audio_duration` long.

    The audio-input tasks start from the text2music result of `params` (extend from its first two
    thirds, grown by a sixth on each side); the windows and strengths are mid-range values.
    """
    length = params.audio_duration
    return {
        RETAKE: replace(params, task=RETAKE, retake_variance=0.5),
        REPAINT: replace(params, task=REPAINT, repaint_start=length / 3, repaint_end=2 * length / 3),
        EXTEND: replace(params, task=EXTEND, repaint_start=-length / 6, repaint_end=5 * length / 6),
        EDIT: replace(params, task=EDIT, edit_target_prompt=params.prompt + ", piano", edit_n_min=0.2,
                      edit_n_max=0.8),
        AUDIO2AUDIO: replace(params, task=AUDIO2AUDIO, ref_audio_strength=0.5),
    }


async def tasks(url: str, params: GenerationParams, source_wave: np.ndarray, runs: int) -> dict:
    """Per task: a warm-up (a new shape's first call), then `runs` timed requests; median latency."""
    client = grpc_client(url)
    out = {}
    try:
        for task, task_params in task_requests(params).items():
            samples = source_wave[0]
            if task == EXTEND:
                samples = samples[:, : round(samples.shape[-1] * 2 / 3)]
            source = SourceAudio(samples, OUTPUT_SAMPLE_RATE) if task in AUDIO_INPUT_TASKS else None
            await one_request(client, task_params, source=source)
            done = [await one_request(client, task_params, source=source) for _ in range(runs)]
            latencies = [r["latency_s"] for r in done]
            out[task] = {"median_s": statistics.median(latencies), "runs_s": latencies, "audio_s": done[-1]["audio_s"],
                         "stages_median_s": {s: statistics.median(r["stages"][s] for r in done) for s in STAGES}}
            print(f"task {task}: {out[task]['median_s']:.3f} s for {out[task]['audio_s']:.1f} s of audio", flush=True)
    finally:
        await client.close()
    return out


async def load_level(url: str, params: GenerationParams, concurrency: int, per_worker: int,
                     memory: ServerMemory | None) -> dict:
    """`concurrency` workers, `per_worker` back-to-back requests each, after one untimed round."""
    client = grpc_client(url)
    try:
        await asyncio.gather(*(one_request(client, params) for _ in range(concurrency)))

        async def worker() -> list[dict]:
            return [await one_request(client, params) for _ in range(per_worker)]

        peak = MemoryPeak(memory) if memory is not None else None
        if peak is not None:
            peak.__enter__()
        try:
            start = time.perf_counter()
            done = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
            wall = time.perf_counter() - start
        finally:
            if peak is not None:
                peak.__exit__()
    finally:
        await client.close()
    latencies = np.array([r["latency_s"] for r in done])
    audio = sum(r["audio_s"] for r in done)
    return {"concurrency": concurrency, "requests": len(done), "wall_s": wall, "audio_s": audio,
            "audio_s_per_s": audio / wall, "latency_p50_s": float(np.percentile(latencies, 50)),
            "latency_p99_s": float(np.percentile(latencies, 99)), "latency_max_s": float(latencies.max()),
            "gpu_memory_peak": peak.peak if peak is not None else None,
            "stages_median_s": {s: statistics.median(r["stages"][s] for r in done) for s in STAGES}}


def model_stats(http_url: str) -> dict:
    """Triton's /v2/models/stats, raw, and per model: rows per execution and ms per request by phase."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=30) as response:
        raw = json.load(response)
    summary = {}
    for model in raw.get("model_stats", []):
        inference = model.get("inference_stats", {})
        count = int(inference.get("success", {}).get("count", 0))
        if not count:
            continue
        per_request = {phase: int(inference.get(phase, {}).get("ns", 0)) / count / 1e6
                       for phase in ("queue", "compute_input", "compute_infer", "compute_output")}
        executions = int(model.get("execution_count", 0))
        summary[model["name"]] = {"requests": count, "rows": int(model.get("inference_count", 0)),
                                  "executions": executions,
                                  "rows_per_execution": int(model.get("inference_count", 0)) / max(executions, 1),
                                  "ms_per_request": per_request}
    return {"summary": summary, "raw": raw}


# ----------------------------------------------------------------------------- gateway


class Gateway:
    """`python -m gateway` in a subprocess, talking gRPC to the server; a context manager."""

    def __init__(self, checkpoint: Path, grpc_url: str, outputs: Path, log_path: Path) -> None:
        from acestep_triton.tritonserver import free_port

        self.port = free_port()
        self.outputs, self.log_path = outputs, log_path
        self.env = dict(os.environ, ACESTEP_CHECKPOINT_PATH=str(checkpoint), ACESTEP_TRITON_URL=grpc_url,
                        ACESTEP_TRITON_PROTOCOL="grpc", ACESTEP_OUTPUTS_DIR=str(outputs), ACESTEP_HOST="127.0.0.1",
                        ACESTEP_PORT=str(self.port), ACESTEP_PRECISION="bf16")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "--log-level", "warning"], env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; log {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not healthy after 60 s; log {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.log.close()

    def generate(self, body: dict) -> tuple[float, bytes, Message]:
        """POST /generate: wall seconds until the WAV bytes are in, the bytes, the response headers."""
        request = urllib.request.Request(f"{self.url}/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            data = response.read()
            headers = response.headers
        return time.perf_counter() - start, data, headers


def gateway_section(checkpoint: Path, grpc_url: str, params: GenerationParams, runs: int, out: Path) -> dict:
    """Median wall time of POST /generate through the gateway (REST, WAV bytes back, file written)."""
    body = {"checkpoint_path": str(checkpoint), **dataclasses.asdict(params)}
    body = {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}
    with Gateway(checkpoint, grpc_url, out / "gateway_outputs", out / "gateway.log") as gateway:
        gateway.generate(body)
        timed = [gateway.generate(body) for _ in range(runs)]
    seconds = [t for t, _, _ in timed]
    _, data, headers = timed[-1]
    path = Path(headers["X-Output-Path"])
    if not (data[:4] == b"RIFF" and path.is_file() and path.stat().st_size > 0):
        raise RuntimeError(f"gateway answered {len(data)} bytes, file {path}: not a WAV response with its file")
    return {"median_s": statistics.median(seconds), "runs_s": seconds, "wav_bytes": len(data), "file": str(path),
            "x_generation_time_s": float(headers["X-Generation-Time"])}


# ----------------------------------------------------------------------------- perf_analyzer


def perf_analyzer_section(checkpoint: Path, lyric_vocab: Path, grpc_url: str, params: GenerationParams, out: Path,
                          concurrency: str) -> dict:
    """perf_analyzer against `acestep` (the benchmark's request) and `dit_step` (two rows of it:
    conditions sent with every request, as a direct client does); a "skipped" reason when it cannot run."""
    from acestep_triton.preprocess import prepare_request
    from acestep_triton.sampling.seeds import latent_frames
    from benchmarks.perf_analyzer import PerfAnalyzerError, parse_concurrency, run_perf_analyzer
    from benchmarks.perf_triton import COUNT_WINDOWS, dit_step_input_data, ensemble_input_data

    try:
        from benchmarks.perf_analyzer import locate_perf_analyzer, perf_analyzer_environment

        locate_perf_analyzer()
        perf_analyzer_environment()
    except PerfAnalyzerError as exc:
        return {"skipped": str(exc)}
    from acestep_triton.lyrics import LyricTokenizer
    from acestep_triton.text_tokenizer import TextTokenizer

    ckpt = validate_checkpoint(checkpoint)
    prepared = prepare_request(params, TextTokenizer.from_pretrained(ckpt.text_encoder).tokenize_one,
                               LyricTokenizer.from_file(lyric_vocab).tokenize)
    tokens = 1 + prepared.text_ids.shape[1] + prepared.lyric_ids.shape[1]
    inputs = {ENSEMBLE_NAME: ensemble_input_data(params),
              "dit_step": dit_step_input_data(checkpoint, params.audio_duration, tokens)}
    extra = {ENSEMBLE_NAME: [*COUNT_WINDOWS, "--measurement-request-count", "8"],
             "dit_step": ["-b", "2", *COUNT_WINDOWS, "--measurement-request-count", "50"]}
    reports = {"frames": latent_frames(params.audio_duration), "condition_tokens": tokens}
    for model, data in inputs.items():
        path = out / f"perf_input_{model}.json"
        path.write_text(json.dumps(data))
        try:
            result = run_perf_analyzer(model, grpc_url, path, parse_concurrency(concurrency),
                                       csv_path=out / f"perf_analyzer_{model}.csv", extra_args=extra[model],
                                       timeout_s=180)
            reports[model] = {"report": (result.stdout + result.stderr).strip()[-6000:]}
        except (PerfAnalyzerError, subprocess.TimeoutExpired) as exc:
            reports[model] = {"skipped": str(exc)[-2000:]}
    return reports


# ----------------------------------------------------------------------------- the run


def parse_settings(pairs: list[str], profile: str) -> dict[str, object]:
    """FIELD=VALUE pairs -> export.build_repository.Profile overrides, typed by the profile's values."""
    from export.build_repository import PROFILES

    base = PROFILES[profile]
    overrides: dict[str, object] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if not hasattr(base, name):
            raise SystemExit(f"--set/--variant: {name!r} is not a Profile setting")
        current = getattr(base, name)
        if isinstance(current, bool):
            value: object = text.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple) or (current is None and not text.isdigit()):
            # GPU indices, or component names (lowvram's cpu_components, resident_weights)
            value = tuple(int(v) if v.isdigit() else v for v in text.split(",") if v)
        elif current is None or isinstance(current, int):
            value = int(text)
        else:
            value = type(current)(text)
        overrides[name] = value
    return overrides


class Run:
    """The results dict, saved after every section; a failing section is logged and recorded."""

    def __init__(self, out: Path, results: dict, budget_s: float, file_name: str = "triton_results.json") -> None:
        self.out, self.results, self.errors, self.file_name = out, results, [], file_name
        self.start, self.budget_s = time.perf_counter(), budget_s

    def save(self) -> None:
        def plain(value):
            return value.tolist() if isinstance(value, np.ndarray) else str(value)

        (self.out / self.file_name).write_text(json.dumps(self.results, indent=1, default=plain))

    def section(self, name: str, fn: Callable[[], object], into: dict | None = None, required: bool = False):
        """Run one section; one that is not `required` is skipped once the time budget is spent."""
        target = self.results if into is None else into
        elapsed = time.perf_counter() - self.start
        if not required and elapsed > self.budget_s:
            print(f"SKIP {name}: {elapsed:.0f} s elapsed > --budget-s {self.budget_s:.0f}", flush=True)
            target[name] = {"skipped": "time budget"}
            self.save()
            return None
        print(f"== {name} ({elapsed:.0f} s)", flush=True)
        try:
            value = fn()
        except Exception as exc:  # keep the other sections' numbers
            traceback.print_exc()
            target[name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.errors.append(name)
            value = None
        else:
            if isinstance(value, dict):
                target[name] = value
        self.save()
        return value


def correctness(triton_wave: np.ndarray, reference: np.ndarray, bound: float) -> dict:
    if triton_wave.shape != reference.shape:
        return {"shape_triton": list(triton_wave.shape), "shape_in_process": list(reference.shape), "passed": False}
    error = relative_error(torch.tensor(triton_wave), torch.tensor(reference))
    return {"rel_l2": error, "bound": bound, "passed": error <= bound}


def serve_and_measure(run: Run, args, checkpoint: Path, params: GenerationParams, reference: np.ndarray | None,
                      overrides: dict, name: str, levels: list[int], full: bool) -> dict:
    """Build the repository with `overrides`, start the server, and run the sections on it into results[name]."""
    from acestep_triton.tritonserver import TritonServer
    from export.build_repository import build_repository

    into: dict = {"settings": {k: v for k, v in overrides.items()}}
    run.results[name] = into
    repository = build_repository(args.profile, checkpoint, Path(args.work) / f"repository-{name}",
                                  args.lyric_vocab, overrides=overrides)
    pool = [f"--cuda-memory-pool-byte-size={gpu}:{args.cuda_pool_mib * 2**20}"
            for gpu in range(torch.cuda.device_count())]
    phase_dir = Path(args.work) / f"phases-{name}"
    shutil.rmtree(phase_dir, ignore_errors=True)
    phase_dir.mkdir(parents=True)
    server = TritonServer(repository, log_path=run.out / f"tritonserver-{name}.log",
                          startup_timeout_s=args.startup_timeout_s, env={**SERVER_ENV, PHASE_LOG_ENV: str(phase_dir)},
                          python=args.server_python, extra_args=pool)
    start = time.perf_counter()
    with server:
        into["server_start_s"] = time.perf_counter() - start
        memory = run.section("memory_probe", lambda: {"idle": ServerMemory(server.process.pid).sample()}, into)
        nvml = ServerMemory(server.process.pid) if memory else None
        print(f"tritonserver ready in {into['server_start_s']:.0f} s", flush=True)
        since = time.time()
        single_out = run.section("single", lambda: _single(server.grpc_url, params, args.runs, into), into,
                                 required=True)
        into["phases_single"] = phase_summary(phase_dir, since, time.time())
        print("phases, single request (median ms per call): " + phase_text(into["phases_single"]), flush=True)
        if single_out is not None and reference is not None:
            run.section("correctness", lambda: correctness(single_out, reference, args.max_rel_l2), into,
                        required=True)
        if full and args.tasks_runs and single_out is not None:
            run.section("tasks", lambda: asyncio.run(tasks(server.grpc_url, params, single_out, args.tasks_runs)),
                        into)
        if full:
            run.section("gateway", lambda: gateway_section(checkpoint, server.grpc_url, params, args.gateway_runs,
                                                           run.out), into)
        into["levels"] = []
        for concurrency in levels:
            since = time.time()
            level = run.section(f"concurrency_{concurrency}", lambda c=concurrency: asyncio.run(
                load_level(server.grpc_url, params, c, args.requests_per_worker, nvml)), into)
            if level is not None:
                level["phases"] = phase_summary(phase_dir, since, time.time())
            if level is not None:
                into["levels"].append(level)
                memory_text = (f"{level['gpu_memory_peak']['mib'] / 1024:.1f} GiB"
                               if level["gpu_memory_peak"] else "n/a")
                print(f"concurrency {concurrency:2d}: {level['audio_s_per_s']:6.1f} audio s / s, p50 "
                      f"{level['latency_p50_s']:.2f} s, p99 {level['latency_p99_s']:.2f} s, GPU {memory_text}",
                      flush=True)
        if into["levels"]:
            top = into["levels"][-1]
            print(f"phases at concurrency {top['concurrency']} (median ms per call): {phase_text(top['phases'])}",
                  flush=True)
            if top["gpu_memory_peak"]:
                print("GPU memory per model at that peak (MiB): " + json.dumps(
                    {k: round(v) for k, v in top["gpu_memory_peak"]["mib_per_model"].items()}), flush=True)
        if full and args.perf_analyzer_concurrency:
            run.section("perf_analyzer", lambda: perf_analyzer_section(
                checkpoint, Path(args.lyric_vocab), server.grpc_url, params, run.out, args.perf_analyzer_concurrency),
                into)
        run.section("stats", lambda: model_stats(server.http_url), into, required=True)
    shutil.copytree(phase_dir, run.out / phase_dir.name, dirs_exist_ok=True)  # every call, for a closer look
    return into


def _single(url: str, params: GenerationParams, runs: int, into: dict) -> np.ndarray:
    out, wave = asyncio.run(single(url, params, runs))
    into["single_request"] = out
    print(f"triton single request: {out['median_s']:.3f} s; stages "
          + json.dumps({k: round(v, 3) for k, v in out["stages_median_s"].items()}), flush=True)
    return wave


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env.get('device')}; torch {env['torch']}; tritonserver from nvidia-pytriton 0.7.0 "
             f"(server 2.51); {results['profile']} profile; commit {env['commit']}; {env['date']}.", "",
             f"Command: `{env['command']}`", "",
             f"Request: {results['duration_s']:.0f} s audio, {results['steps']} steps, contract defaults, "
             f"seed {REQUEST_SEED}.", ""]
    inproc = results.get("in_process", {})
    for name in [k for k in results if k == "main" or k.startswith("variant")]:
        part = results[name]
        lines += [f"### {name}: settings {json.dumps(part.get('settings', {}))}", ""]
        single_out = part.get("single_request", {})
        gateway = part.get("gateway", {})
        rows = []
        if "median_s" in inproc:
            rows.append(("in-process, waveform in host memory", inproc["median_s"], None))
        if "median_s" in single_out:
            base = inproc.get("median_s")
            rows.append(("Triton gRPC, one request", single_out["median_s"], base))
        if "median_s" in gateway:
            rows.append(("gateway REST, WAV back, file written", gateway["median_s"], single_out.get("median_s")))
        if rows:
            lines += ["| path | median wall s | RTF | over the row above |", "|---|---|---|---|"]
            for label, seconds, base in rows:
                over = f"{(seconds - base) * 1e3:+.0f} ms ({(seconds / base - 1) * 100:+.1f} %)" if base else ""
                lines.append(f"| {label} | {seconds:.3f} | {results['duration_s'] / seconds:.1f}x | {over} |")
            lines.append("")
        check = part.get("correctness", {})
        if "rel_l2" in check:
            verdict = "PASS" if check["passed"] else "FAIL"
            lines += [f"Correctness: relative L2 of the waveform, Triton vs in-process: {check['rel_l2']:.2e} "
                      f"(bound {check['bound']:g}): {verdict}.", ""]
        if part.get("levels"):
            lines += ["| concurrency | requests | wall s | audio s / wall s | p50 s | p99 s | "
                      "GPU memory peak GiB (server processes, NVML) |", "|" + "---|" * 7]
            for r in part["levels"]:
                memory = f"{r['gpu_memory_peak']['mib'] / 1024:.1f}" if r["gpu_memory_peak"] else "n/a"
                lines.append(f"| {r['concurrency']} | {r['requests']} | {r['wall_s']:.2f} | {r['audio_s_per_s']:.1f} "
                             f"| {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {memory} |")
            lines.append("")
        stats = part.get("stats", {}).get("summary", {})
        if stats:
            lines += ["| model | requests | rows / execution | queue ms | input ms | infer ms | output ms |",
                      "|" + "---|" * 7]
            for model, s in stats.items():
                ms = s["ms_per_request"]
                lines.append(f"| {model} | {s['requests']} | {s['rows_per_execution']:.2f} | {ms['queue']:.2f} | "
                             f"{ms['compute_input']:.2f} | {ms['compute_infer']:.2f} | {ms['compute_output']:.2f} |")
            lines.append("")
        task_times = {k: v for k, v in part.get("tasks", {}).items() if isinstance(v, dict)}
        if task_times:
            lines += ["| task | audio s | median wall s | RTF | diffusion s |", "|---|---|---|---|---|"]
            for task, t in task_times.items():
                lines.append(f"| {task} | {t['audio_s']:.1f} | {t['median_s']:.3f} | {t['audio_s'] / t['median_s']:.1f}x "
                             f"| {t['stages_median_s'].get('diffusion', float('nan')):.3f} |")
            lines.append("")
        perf = part.get("perf_analyzer", {})
        for model in (ENSEMBLE_NAME, "dit_step"):
            if model in perf:
                entry = perf[model]
                text = entry.get("report", "")
                summary = [line for line in text.splitlines() if "Concurrency:" in line]
                lines.append(f"perf_analyzer {model}: " + ("; ".join(summary) if summary
                                                           else f"skipped: {entry.get('skipped', '')[:300]}"))
        if "skipped" in perf:
            lines.append(f"perf_analyzer skipped: {perf['skipped']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--work", default="/tmp/acestep-bench", help="checkpoint and model repositories go here")
    parser.add_argument("--server-python", type=Path,
                        default=Path(os.environ.get("ACESTEP_SERVER_PYTHON", sys.executable)),
                        help="interpreter whose packages the server's python models import "
                             "(default: $ACESTEP_SERVER_PYTHON, else this one)")
    parser.add_argument("--profile", default="gpu", help="export.build_repository profile (cpu: a smoke run)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="serve this checkpoint instead of the full-size random one written into --work")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--runs", type=int, default=5, help="single-request runs, in-process and Triton (median)")
    parser.add_argument("--gateway-runs", type=int, default=3)
    parser.add_argument("--no-in-process", dest="in_process", action="store_false",
                        help="skip the in-process reference (and so the correctness check): a short device call")
    parser.add_argument("--tasks-runs", type=int, default=0,
                        help="timed requests of each task other than text2music (0: the section is skipped)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a gpu-profile setting (export.build_repository.Profile), e.g. dcae_decoder_instances=1")
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="also measure a repository with these settings on top of --set, e.g. loop_device=cuda")
    parser.add_argument("--variant-concurrency", type=int, default=8)
    parser.add_argument("--perf-analyzer-concurrency", default="4", help="start[:end[:step]]; empty to skip")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections other than in-process, single request, correctness and stats are skipped "
                             "once this many seconds have passed (the device's 10-minute calls)")
    parser.add_argument("--cuda-pool-mib", type=int, default=256,
                        help="Triton's CUDA memory pool per GPU: GPU tensors between models are placed there "
                             "(beyond it they cross by CUDA IPC, slower); Triton's default is 64")
    parser.add_argument("--max-rel-l2", type=float, default=MAX_REL_L2)
    parser.add_argument("--lyric-vocab", default=str(DEFAULT_LYRIC_VOCAB))
    parser.add_argument("--startup-timeout-s", type=float, default=420.0)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    from export.build_repository import resolve_profile

    overrides = parse_settings(args.set, args.profile)
    variants = [parse_settings([p for p in v.split(",") if p], args.profile) for v in args.variant]
    profile = resolve_profile(args.profile, overrides)
    params = GenerationParams(prompt=PROMPT, lyrics=LYRICS, audio_duration=args.duration, infer_step=args.steps,
                              actual_seeds=(REQUEST_SEED,))
    results: dict = {"env": {**environment(args), "server_python": str(args.server_python)},
                     "duration_s": args.duration, "steps": args.steps, "profile": args.profile}
    run = Run(out, results, args.budget_s)

    start = time.perf_counter()
    checkpoint = (validate_checkpoint(args.checkpoint).root if args.checkpoint
                  else write_checkpoint(work / "checkpoint", Path(args.lyric_vocab)))
    results["checkpoint_s"] = time.perf_counter() - start
    print(f"checkpoint ready in {results['checkpoint_s']:.0f} s", flush=True)
    reference = None

    def in_process_section() -> dict:
        nonlocal reference
        numbers, reference = in_process(checkpoint, Path(args.lyric_vocab), params, args.runs, profile)
        print(f"in-process: {numbers['median_s']:.3f} s (load {numbers['load_s']:.0f} s)", flush=True)
        return numbers

    if args.in_process:
        run.section("in_process", in_process_section, required=True)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    serve_and_measure(run, args, checkpoint, params, reference, overrides, "main", levels, full=True)
    for i, variant in enumerate(variants):
        if time.perf_counter() - run.start > args.budget_s:
            results[f"variant{i + 1}"] = {"settings": variant, "skipped": "time budget"}
            continue
        serve_and_measure(run, args, checkpoint, params, reference, {**overrides, **variant}, f"variant{i + 1}",
                          [args.variant_concurrency], full=False)
    run.save()
    text = markdown(results)
    (out / "triton_results.md").write_text(text)
    print(text)
    failed = [name for name, part in results.items()
              if isinstance(part, dict) and part.get("correctness", {}).get("passed") is False]
    if failed or (args.in_process and reference is None):
        print("\n" + "!" * 78 + f"\nFAIL: Triton's waveform differs from in-process beyond {args.max_rel_l2:g} "
              f"(relative L2) in {failed or 'the in-process reference (missing)'}: a fast but wrong path.\n"
              + "!" * 78, flush=True)
        return 1
    if run.errors:
        print(f"sections with errors: {run.errors} (see triton_results.json)", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
