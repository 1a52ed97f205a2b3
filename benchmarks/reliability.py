"""The reliability suite (issue 14): load, faults, inputs and security against the real stack, one command.

    python -m benchmarks.reliability --checkpoint DIR [--lyric-vocab FILE] [--out RELIABILITY.md]
    python -m benchmarks.reliability --quick            # CI's short version (tests/test_reliability_suite.py)
    python -m benchmarks.reliability --only faults:stub:dit_step,security     # rows by id prefix
    python -m benchmarks.reliability --profile gpu --checkpoint DIR --only recovery   # the GPU row
    python -m benchmarks.reliability --quick --triton HOST:PORT --triton-metrics URL ...  # on a running server

The stack is what `make serve` runs, in pieces: tritonserver under acestep_triton.supervisor in this
process (so the suite reads each measured recovery) and `python -m gateway` as a subprocess (so it
can be killed mid-write, restarted, and run in a private mount namespace over a full disk). Every
row says what it did, what it measured and the command that runs it alone (--triton: a running
server instead, whose processes the suite leaves alone: CI passes the test session's); it writes them
to --out (RELIABILITY.md) with the machine, the date and the commit, and exits 1 when a row failed.

Sections (ids for --only):
  load       load:c<N>: N clients send --requests requests together; every accepted one must give a
             whole WAV equal to its file, every refused one a clear error (429/503 with Retry-After)
  faults     faults:stub:<model> (every stub of the model killed mid-request, in turn; the supervisor
             reloads it), faults:tritonserver (killed mid-request; restarted), faults:gateway-mid-write
             (SIGKILL while a file is being written; restarted), faults:disk-full (a 4 MB tmpfs in a
             private mount namespace: 507), faults:client-disconnect, faults:slow-client
  inputs     inputs:openapi (schemathesis, every operation), inputs:lyrics, inputs:prompt, inputs:uploads
             (hypothesis; benchmarks/reliability_checks.py)
  security   security:body-limit, :api-key, :internal-text, :headers, :cors, :paths
  recovery   recovery:dit_step: the dit_step stub killed with nothing in flight; reload (and the gpu
             profile's warm-up) until the first generation answers
--quick keeps what CI needs in about two minutes on 2 cores: three load levels of 8 requests, the
dit_step stub (not with --triton), the gateway killed mid-write, the full disk, a client
disconnecting, a short slow read, fewer fuzz examples (derandomized), and every security row.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import soundfile

from acestep_triton.supervisor import Supervisor
from acestep_triton.tritonserver import REPO_ROOT, TritonServer, free_port, stub_processes
from gateway.jobs import DISCONNECT_REASON, RESTART_REASON
from gateway.outputs import TEMP_PREFIX

LOAD_LEVELS = (1, 2, 4, 8, 16, 32)
QUICK_LOAD_LEVELS = (1, 4, 16)
QUICK_STUBS = ("dit_step",)
LONG_STEPS = 30  # a generation still in its loop when a fault is injected (tiny checkpoint on CPU: seconds)
RECOVERY_TIMEOUT_S = 900.0


@dataclass
class Row:
    """One line of the report."""

    id: str
    what: str
    ok: bool | None  # None: skipped (the figures say why)
    figures: str
    command: str  # runs this row alone
    seconds: float = 0.0


def short_body(checkpoint: Path, **changes) -> dict:
    """The contract's request, cut to what runs in about a second on the tiny checkpoint on CPU."""
    return {
        "checkpoint_path": str(checkpoint), "audio_duration": 2.0, "prompt": "pop, upbeat, energetic",
        "lyrics": "[verse]\nHello world", "infer_step": 2, "guidance_scale": 15.0, "scheduler_type": "euler",
        "cfg_type": "apg", "omega_scale": 10.0, "actual_seeds": [7], "guidance_interval": 0.5,
        "guidance_interval_decay": 0.0, "min_guidance_scale": 3.0, "use_erg_tag": True, "use_erg_lyric": True,
        "use_erg_diffusion": True, "oss_steps": [],
    } | changes


def wait_until(predicate: Callable[[], object], timeout_s: float, every_s: float = 0.1) -> object:
    """predicate()'s first true value, or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s")
        time.sleep(every_s)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class GatewayProcess:
    """`python -m gateway` as a subprocess (optionally behind `wrap`, e.g. unshare), on a free port."""

    def __init__(self, checkpoint: Path, grpc_url: str, outputs: Path, log: Path, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outputs, self.log_path, self.wrap = outputs, log, wrap or []
        self.env = dict(os.environ, ACESTEP_CHECKPOINT_PATH=str(checkpoint), ACESTEP_TRITON_URL=grpc_url,
                        ACESTEP_OUTPUTS_DIR=str(outputs), PYTHONPATH=str(REPO_ROOT)) | (env or {})
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> GatewayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or self.status("/health") == 200, timeout_s, 0.2)
        if self.process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({self.process.returncode}); log {self.log_path}")
        return self

    def status(self, path: str) -> int | None:
        try:
            return httpx.get(self.url + path, timeout=5).status_code
        except httpx.TransportError:
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=120)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class Suite:
    """The stack and the rows run against it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from export.build_repository import build_repository, profile_environment, resolve_profile, server_arguments

        self.args = args
        self.profile = resolve_profile(args.profile, dict(args.set))
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.checkpoint = Path(args.checkpoint).resolve()
        if not self.checkpoint.exists():  # the GPU machine: bench_triton's full-size random checkpoint
            from benchmarks.bench_triton import write_checkpoint

            write_checkpoint(self.checkpoint, Path(args.lyric_vocab))
        self.supervisor: Supervisor | None = None  # None: a server of someone else's (--triton)
        self.grpc_url, self.metrics_url = args.triton, args.triton_metrics
        if not args.triton:
            repository = build_repository(args.profile, self.checkpoint, self.work / "repository", args.lyric_vocab,
                                          overrides=dict(args.set))
            import torch

            gpus = torch.cuda.device_count() if self.profile.device == "cuda" else 0
            self.triton = TritonServer(repository, log_path=self.work / "tritonserver.log",
                                       startup_timeout_s=RECOVERY_TIMEOUT_S, python=args.server_python,
                                       env=profile_environment(self.profile),
                                       extra_args=server_arguments(self.profile, gpus))
            self.supervisor = Supervisor(self.triton)
            self.grpc_url, self.metrics_url = self.triton.grpc_url, self.triton.metrics_url
        self.outputs = self.work / "outputs"
        self.command = " ".join(["python -m benchmarks.reliability", "--checkpoint", str(args.checkpoint),
                                 *(["--lyric-vocab", str(args.lyric_vocab)] if args.lyric_vocab else []),
                                 *(["--profile", args.profile] if args.profile != "cpu" else []),
                                 *(f"--set {k}={v}" for k, v in args.set)])
        self.gateway: GatewayProcess | None = None
        self.rows: list[Row] = []
        self.commit = commit()  # what runs: taken now, edits made during a run do not count

    # ---- the stack -------------------------------------------------------------------------------------

    def __enter__(self) -> Suite:
        start = time.monotonic()
        if self.supervisor is not None:
            self.supervisor.start()
        self.gateway = self.new_gateway(self.outputs, "gateway.log").start()
        self.startup_s = time.monotonic() - start
        return self

    def __exit__(self, *exc) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.supervisor is not None:
            self.supervisor.stop()

    def new_gateway(self, outputs: Path, log: str, wrap: list[str] | None = None, **env: str) -> GatewayProcess:
        return GatewayProcess(self.checkpoint, self.grpc_url, outputs, self.work / log,
                              {"ACESTEP_PRECISION": "bf16" if self.profile.dtype == "bfloat16" else "fp32", **env},
                              wrap)

    def body(self, **changes) -> dict:
        return short_body(self.checkpoint, **changes)

    def post(self, path: str, body: dict, gateway: GatewayProcess | None = None, timeout: float = 600.0,
             **kwargs) -> httpx.Response:
        return httpx.post((gateway or self.gateway).url + path, json=body, timeout=timeout, **kwargs)

    def get(self, path: str, gateway: GatewayProcess | None = None) -> httpx.Response:
        return httpx.get((gateway or self.gateway).url + path, timeout=30)

    def healthy(self) -> bool:
        return self.gateway.status("/health") == 200

    def dit_steps(self) -> int:
        """Triton's count of dit_step executions so far (its metrics)."""
        text = httpx.get(self.metrics_url, timeout=5).text
        found = re.search(r'^nv_inference_request_success\{model="dit_step",version="1"\} (\d+)', text, re.M)
        return int(found.group(1)) if found else 0

    def running_job(self, timeout_s: float = 120.0) -> dict:
        """The newest job once it is in the loop (a step done)."""
        def in_loop():
            jobs = self.get("/jobs?limit=1").json()["jobs"]
            return jobs and jobs[0]["state"] == "running" and jobs[0]["step"] >= 1 and jobs[0]
        return wait_until(in_loop, timeout_s)

    def job_states(self, job_id: str) -> list[str]:
        """The state of each event of a finished job's stream."""
        events = self.get(f"/jobs/{job_id}/events").text.splitlines()
        return [json.loads(line.removeprefix("data:"))["state"] for line in events if line.startswith("data:")]

    def partial_files(self, root: Path) -> list[str]:
        return sorted(p.name for p in root.glob(f"{TEMP_PREFIX}*"))

    def whole_wav(self, response: httpx.Response) -> str:
        """"" when a 200 answer is a whole stereo WAV equal to the file it names, else what is wrong."""
        try:
            audio, _ = soundfile.read(io.BytesIO(response.content), dtype="float32")
        except (RuntimeError, soundfile.LibsndfileError) as error:
            return f"undecodable body: {error}"
        path = Path(response.headers["X-Output-Path"])
        if audio.ndim != 2 or audio.shape[1] != 2 or len(audio) == 0:
            return f"audio of shape {audio.shape}"
        if not path.is_file() or path.read_bytes() != response.content:
            return f"{path.name} differs from the body"
        return ""

    def generate_in_background(self, **changes) -> tuple[threading.Thread, list]:
        answers: list = []

        def send() -> None:
            try:
                answers.append(self.post("/generate", self.body(**changes)))
            except httpx.HTTPError as error:
                answers.append(error)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread, answers

    def first_request_after(self) -> str:
        """Waits for /health, then one generation: its status and seconds."""
        wait_until(self.healthy, RECOVERY_TIMEOUT_S, 0.2)
        start = time.monotonic()
        response = self.post("/generate", self.body())
        return f"{response.status_code} in {time.monotonic() - start:.1f} s"

    # ---- rows ------------------------------------------------------------------------------------------

    def run(self, row_id: str, what: str, check: Callable[[], tuple[bool | None, str]]) -> None:
        if not selected(row_id, self.args.only):
            return
        start = time.monotonic()
        try:
            ok, figures = check()
        except Exception as error:  # a row that raised failed; the others still run
            ok, figures = False, f"raised {type(error).__name__}: {error}"
        row = Row(row_id, what, ok, figures, f"{self.command} --only {row_id}", time.monotonic() - start)
        self.rows.append(row)
        print(f"{'PASS' if ok else 'SKIP' if ok is None else 'FAIL'} {row_id} ({row.seconds:.0f} s): {figures}",
              flush=True)

    def load(self, clients: int) -> tuple[bool, str]:
        """`clients` threads send --requests requests (at least `clients`) together; each answer checked."""
        def one(i: int) -> tuple[str, float, str]:
            start = time.monotonic()
            response = self.post("/generate", self.body(actual_seeds=[i], output_path=f"load_c{clients}_{i}.wav"))
            seconds = time.monotonic() - start
            if response.status_code == 200:
                problem = self.whole_wav(response)
                return ("bad", seconds, problem) if problem else ("ok", seconds, "")
            clear = response.status_code in (429, 503) and "Retry-After" in response.headers and \
                response.json().get("detail")
            return ("refused" if clear else "bad", seconds, f"{response.status_code} {response.text[:200]}")

        start = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(max(self.args.requests, clients))))
        wall = time.monotonic() - start
        ok = [s for kind, s, _ in results if kind == "ok"]
        refused = sum(kind == "refused" for kind, _, _ in results)
        bad = [why for kind, _, why in results if kind == "bad"]
        figures = (f"{len(ok)}/{len(results)} whole files, {refused} refused (429/503 + Retry-After), "
                   f"{len(bad)} bad; p50 {percentile(ok, 0.5):.2f} s, p99 {percentile(ok, 0.99):.2f} s, "
                   f"{len(ok) / wall:.2f} requests/s" if ok else f"no answer with audio; {bad[:2]}")
        return not bad and bool(ok), figures + (f"; first bad: {bad[0]}" if bad else "")

    def stub_fault(self, model: str) -> tuple[bool, str]:
        """Every stub of `model` killed while a generation is in its loop."""
        recoveries = len(self.supervisor.recoveries)
        thread, answers = self.generate_in_background(infer_step=LONG_STEPS, output_path=f"stub_{model}.wav")
        job = self.running_job()
        victims = [s.pid for s in stub_processes(self.triton.process.pid) if s.model == model]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(RECOVERY_TIMEOUT_S)
        answered_s, answer = time.monotonic() - killed, answers[0]
        recovery = wait_until(lambda: next((r for r in self.supervisor.recoveries[recoveries:] if r.target == model),
                                           None), RECOVERY_TIMEOUT_S)
        after = self.first_request_after()
        status = answer.status_code if isinstance(answer, httpx.Response) else repr(answer)
        retried = self.job_states(job["id"]).count("queued") > 1
        problem = self.whole_wav(answer) if status == 200 else ""
        ok = status in (200, 503) and not problem and recovery.ok and after.startswith("200")
        ok = ok and not self.partial_files(self.outputs)
        return ok, (f"{len(victims)} stub(s) killed; the request in flight: {status} {answered_s:.1f} s later"
                    f"{' (cut off, queued again, run again)' if retried else ''}{' ' + problem if problem else ''}; "
                    f"reload {recovery.seconds:.1f} s; first request after: {after}")

    def tritonserver_fault(self) -> tuple[bool, str]:
        recoveries = len(self.supervisor.recoveries)
        thread, answers = self.generate_in_background(infer_step=LONG_STEPS, output_path="triton_killed.wav")
        self.running_job()
        os.kill(self.triton.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(1.0)
        health = self.get("/health")
        during = self.post("/generate", self.body(), timeout=60)
        retry_after = during.headers.get("Retry-After")
        thread.join(RECOVERY_TIMEOUT_S)
        answered_s, answer = time.monotonic() - killed, answers[0]
        recovery = wait_until(lambda: next((r for r in self.supervisor.recoveries[recoveries:]
                                            if r.target == "tritonserver"), None), RECOVERY_TIMEOUT_S)
        after = self.first_request_after()
        status = answer.status_code if isinstance(answer, httpx.Response) else repr(answer)
        ok = health.status_code == 503 and during.status_code == 503 and retry_after is not None
        ok = ok and status in (200, 503) and recovery.ok and after.startswith("200")
        return ok, (f"/health meanwhile {health.status_code}, a new /generate {during.status_code} with "
                    f"Retry-After {retry_after} s; the request in flight: {status} {answered_s:.1f} s later; "
                    f"restart {recovery.seconds:.1f} s; first request after: {after}")

    def gateway_mid_write(self) -> tuple[bool, str]:
        """SIGKILL the gateway while a big file's temporary file exists, then restart it."""
        for attempt in range(1, 4):
            thread, _ = self.generate_in_background(audio_duration=40.0, infer_step=1, actual_seeds=[1, 2],
                                                    output_path="mid_write.wav")
            seen = None
            while thread.is_alive() and not seen:
                seen = self.partial_files(self.outputs)
                time.sleep(0.001)
            if seen:
                break
        else:
            return False, "the write finished before the gateway could be killed, three times"
        self.gateway.kill()
        thread.join(60)
        finals = sorted(p for p in self.outputs.glob("mid_write*.wav"))
        broken = [p.name for p in finals if soundfile.info(p).frames != len(soundfile.read(p)[0])]
        self.gateway.start()
        left = self.partial_files(self.outputs)
        job = self.get("/jobs?limit=1").json()["jobs"][0]
        after = self.first_request_after()
        ok = not broken and not left and job["state"] == "failed" and job["error"] == RESTART_REASON
        return ok and after.startswith("200"), (
            f"killed with {seen} being written (attempt {attempt}); under final names after restart: "
            f"{[p.name for p in finals] or 'nothing'}, broken: {broken or 'none'}; temporary files left: "
            f"{left or 'none'}; the job: {job['state']} ({job['error']}); first request after: {after}")

    def disk_full(self) -> tuple[bool, str]:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return None, "skipped: needs root and unshare for a private mount namespace"
        outputs = self.work / "full-outputs"
        outputs.mkdir(exist_ok=True)
        mount = f"mount -t tmpfs -o size=4m tmpfs {outputs} && exec \"$0\" \"$@\""
        gateway = self.new_gateway(outputs, "gateway-full.log", wrap=["unshare", "-m", "sh", "-c", mount]).start()
        try:
            seen = Path(f"/proc/{gateway.process.pid}/root") / outputs.relative_to("/")  # the namespace's view
            full = self.post("/generate", self.body(audio_duration=30.0, output_path="too_big.wav"), gateway)
            # what the failed write left: the job store and the gateway's empty folders (uploads) aside
            left = sorted(p.name for p in seen.iterdir()
                          if not p.name.startswith(".jobs.sqlite3") and not (p.is_dir() and not any(p.iterdir())))
            small = self.post("/generate", self.body(audio_duration=1.0, output_path="fits.wav"), gateway)
            fits = self.get("/download/fits.wav", gateway)
            ok = full.status_code == 507 and "no space" in full.json()["detail"] and not left
            ok = ok and small.status_code == 200 and fits.content == small.content
            return ok, (f"30 s of audio into 4 MB: {full.status_code} {full.json()['detail']!r}; left behind: "
                        f"{left or 'nothing'}; then 1 s of audio: {small.status_code}, its download equal: "
                        f"{fits.content == small.content}")
        finally:
            gateway.stop()

    def client_disconnect(self) -> tuple[bool, str]:
        before = self.dit_steps()
        try:
            self.post("/generate", self.body(infer_step=300, output_path="gone.wav"), timeout=3.0)
            return False, "the request finished before the client left"
        except httpx.ReadTimeout:
            pass
        job = wait_until(lambda: (j := self.get("/jobs?limit=1").json()["jobs"][0])["state"] in
                         ("succeeded", "failed", "cancelled") and j, 60)
        at_cancel = self.dit_steps()
        time.sleep(2.0)
        after = self.dit_steps()
        ok = job["state"] == "cancelled" and job["error"] == DISCONNECT_REASON and after - at_cancel <= 2
        ok = ok and not (self.outputs / "gone.wav").exists()
        return ok, (f"client left after 3 s: job {job['state']} ({job['error']}); dit_step requests: "
                    f"{at_cancel - before} before, {after - at_cancel} in the 2 s after; no file: "
                    f"{not (self.outputs / 'gone.wav').exists()}")

    def slow_client(self) -> tuple[bool, str]:
        seconds = 2.0 if self.args.quick else 10.0
        made = self.post("/generate", self.body(audio_duration=20.0, infer_step=1, output_path="slow.wav"))
        size = len(made.content)
        rate = size / seconds
        received = bytearray()

        def read_slowly() -> None:
            with socket.create_connection(("127.0.0.1", self.gateway.port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                sock.sendall(b"GET /download/slow.wav HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while chunk := sock.recv(16384):
                    received.extend(chunk)
                    time.sleep(len(chunk) / rate)

        reader = threading.Thread(target=read_slowly)
        reader.start()
        health = []
        while reader.is_alive():
            start = time.monotonic()
            self.get("/health")
            health.append(time.monotonic() - start)
            time.sleep(0.05)
        start = time.monotonic()
        other = self.post("/generate", self.body())
        other_s = time.monotonic() - start
        reader.join()
        body = bytes(received).split(b"\r\n\r\n", 1)[1]
        ok = body == made.content and other.status_code == 200 and percentile(health, 0.99) < 1.0
        return ok, (f"{size / 1e6:.1f} MB read at {rate / 1e6:.2f} MB/s; the bytes equal the file: "
                    f"{body == made.content}; meanwhile /health p99 {percentile(health, 0.99) * 1000:.0f} ms "
                    f"({len(health)} calls), a generation {other.status_code} in {other_s:.1f} s")

    def recovery_row(self) -> tuple[bool, str]:
        """dit_step's stub killed with nothing in flight: reload until ready, then the first generation."""
        recoveries = len(self.supervisor.recoveries)
        wait_until(self.healthy, RECOVERY_TIMEOUT_S)
        killed = time.monotonic()
        for stub in stub_processes(self.triton.process.pid):
            if stub.model == "dit_step":
                os.kill(stub.pid, signal.SIGKILL)
        recovery = wait_until(lambda: next((r for r in self.supervisor.recoveries[recoveries:]
                                            if r.target == "dit_step"), None), RECOVERY_TIMEOUT_S)
        after = self.first_request_after()
        total = time.monotonic() - killed
        warm_up = ", warm-up" if self.profile.accelerate or self.profile.low_vram else ""
        return recovery.ok and after.startswith("200"), (
            f"reload (unload + load{warm_up}) {recovery.seconds:.1f} s; "
            f"first generation after: {after}; kill to first audio {total:.1f} s")


def selected(row_id: str, only: list[str]) -> bool:
    return not only or any(row_id == o or row_id.startswith(o + ":") for o in only)


def rows(suite: Suite) -> Iterator[tuple[str, str, Callable[[], tuple[bool | None, str]]]]:
    """Every row: id, what it checks, the check."""
    from benchmarks import reliability_checks as checks

    args = suite.args
    for clients in QUICK_LOAD_LEVELS if args.quick else LOAD_LEVELS:
        yield (f"load:c{clients}", f"{clients} concurrent clients, {max(args.requests, clients)} requests",
               lambda c=clients: suite.load(c))
    if suite.supervisor is None:
        yield ("faults:stub", "python-backend stubs and tritonserver killed mid-request",
               lambda: (None, "skipped: --triton names a server this suite does not own (tests/test_reliability.py "
                              "kills dit_step's stub and tritonserver under `make serve`)"))
    else:
        models = QUICK_STUBS if args.quick else sorted({s.model for s in stub_processes(suite.triton.process.pid)})
        for model in models:
            yield (f"faults:stub:{model}", f"every {model} stub killed mid-request",
                   lambda m=model: suite.stub_fault(m))
    if not args.quick and suite.supervisor is not None:
        yield "faults:tritonserver", "tritonserver killed mid-request", suite.tritonserver_fault
    yield "faults:gateway-mid-write", "the gateway killed while writing a file", suite.gateway_mid_write
    yield "faults:disk-full", "the outputs disk full (ENOSPC)", suite.disk_full
    yield "faults:client-disconnect", "a client leaving mid-request", suite.client_disconnect
    yield "faults:slow-client", "a slow client reading the WAV", suite.slow_client
    examples = 10 if args.quick else 200
    yield from checks.input_rows(suite.checkpoint, args.lyric_vocab, examples, args.quick)
    yield from checks.security_rows(suite)
    if not args.quick and suite.supervisor is not None:  # quick: faults:stub:dit_step measures the same reload
        yield "recovery:dit_step", "dit_step's stub killed; time to the first audio again", suite.recovery_row


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    gpu = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return f"{cpu}, {os.cpu_count()} cores, {memory / 2**20:.0f} GiB" + (f", {gpu}" if gpu else "")


def commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    sha = run("rev-parse", "--short", "HEAD") or os.environ.get("ACESTEP_COMMIT", "unknown")
    return sha + (" (with uncommitted changes)" if run("status", "--porcelain", "--untracked-files=no") else "")


def report(suite: Suite, wall_s: float) -> str:
    args = suite.args
    passed = sum(r.ok is True for r in suite.rows)
    failed = [r.id for r in suite.rows if r.ok is False]
    lines = [
        "# Reliability", "",
        f"Written by `{' '.join(['python -m benchmarks.reliability', *sys.argv[1:]])}` "
        f"({'quick' if args.quick else 'full'} run, {wall_s:.0f} s).", "",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- commit: {suite.commit}",
        f"- profile: {args.profile}; checkpoint: {suite.checkpoint}; python {platform.python_version()}; "
        f"the stack ({'tritonserver supervised' if suite.supervisor else 'the given tritonserver'} + "
        f"`python -m gateway`) was ready in {suite.startup_s:.0f} s",
        f"- result: {passed} passed, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}, "
        f"{sum(r.ok is None for r in suite.rows)} skipped", "",
    ]
    for section in ("load", "faults", "inputs", "security", "recovery"):
        section_rows = [r for r in suite.rows if r.id.split(":")[0] == section]
        if not section_rows:
            continue
        lines += [f"## {section}", "", "| row | what | result | figures | command |", "| --- | --- | --- | --- | --- |"]
        for r in section_rows:
            result = "pass" if r.ok else "skipped" if r.ok is None else "**FAIL**"
            lines.append(f"| {r.id} | {r.what} | {result} | {r.figures.replace('|', '/')} | `{r.command}` |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory (the tiny one on CPU); a missing one is written with "
                        "benchmarks.bench_triton's full-size random weights (CUDA)")
    parser.add_argument("--lyric-vocab", default=None, help="default: $ACESTEP_LYRIC_VOCAB or beside the checkpoint")
    parser.add_argument("--profile", default="cpu", help="export.build_repository profile")
    parser.add_argument("--set", action="append", default=[], type=lambda kv: kv.split("=", 1),
                        metavar="FIELD=VALUE", help="a profile setting (export.build_repository overrides)")
    parser.add_argument("--triton", default="", metavar="HOST:PORT",
                        help="a running tritonserver's gRPC address instead of starting one (the rows that kill "
                        "its processes are skipped); with --triton-metrics")
    parser.add_argument("--triton-metrics", default="", metavar="URL", help="its metrics URL (with --triton)")
    parser.add_argument("--server-python", type=Path, default=None,
                        help="the interpreter whose packages the python models import (the GPU machine's numpy-1 env)")
    parser.add_argument("--only", default="", help="comma-separated row ids or prefixes (load, faults:stub, ...)")
    parser.add_argument("--quick", action="store_true", help="CI's short version")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per load level, at least its clients (32; quick 8)")
    parser.add_argument("--work", default="/tmp/acestep-reliability", help="repository, outputs and logs go here")
    parser.add_argument("--out", default=str(REPO_ROOT / "RELIABILITY.md"))
    args = parser.parse_args(argv)
    args.only = [o for o in args.only.split(",") if o]
    args.requests = args.requests or (8 if args.quick else 32)
    args.set = [(k, json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v) for k, v in args.set]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    start = time.monotonic()
    with Suite(args) as suite:
        for row_id, what, check in list(rows(suite)):
            suite.run(row_id, what, check)
    text = report(suite, time.monotonic() - start)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")
    return 1 if any(r.ok is False for r in suite.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
