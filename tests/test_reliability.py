"""The three failures of issue 14, against the service as an operator runs it (`python -m acestep_triton.serve`).

One service for the module (the golden tiny checkpoint on CPU, two generations at a time), driven only
over HTTP and with signals, in this order: the `dit_step` python-backend stub is killed (a model
process dying: OOM kill, CUDA fault), then tritonserver itself, then the service gets SIGTERM with a
generation running. Each test starts from a service that generates.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from tests.rest_requests import short_request

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 900.0
RECOVERY_TIMEOUT_S = 600.0  # a tritonserver restart loads every model again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with(*fragments: str) -> list[int]:
    """Live processes whose command line contains every fragment."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and all(f in cmdline for f in fragments):
            found.append(int(entry.name))
    return found


def wait_for(predicate, timeout_s: float, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


@dataclass
class Service:
    process: subprocess.Popen
    url: str
    outputs: Path
    repository: Path
    log: Path
    checkpoint: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response | None:
        """GET, or None when nothing answers."""
        try:
            return httpx.get(self.url + path, timeout=timeout)
        except httpx.TransportError:
            return None

    def generate(self, timeout: float = 300.0, **changes) -> httpx.Response | None:
        try:
            return httpx.post(self.url + "/generate", json=short_request(self.checkpoint, **changes), timeout=timeout)
        except httpx.TransportError:
            return None

    def healthy(self) -> bool:
        answer = self.get("/health")
        return answer is not None and answer.status_code == 200

    def stub_pid(self, model: str) -> int:
        (pid,) = pids_with("triton_python_backend_stub", f"{self.repository}/{model}/1/model.py")
        return pid

    def triton_pid(self) -> int:
        (pid,) = pids_with("bin/tritonserver", f"--model-repository={self.repository}")
        return pid


@pytest.fixture(scope="module")
def service(tmp_path_factory, golden_ckpt: Path, lyric_vocab: Path):
    root = tmp_path_factory.mktemp("service")
    port = free_port()
    log = root / "serve.log"
    env = dict(os.environ, ACESTEP_LYRIC_VOCAB=str(lyric_vocab), ACESTEP_MAX_RUNNING_JOBS="2",
               ACESTEP_MAX_PENDING_JOBS="4", ACESTEP_SHUTDOWN_DEADLINE_S="900")
    command = [
        sys.executable, "-m", "acestep_triton.serve", "--profile", "cpu", "--checkpoint", str(golden_ckpt),
        "--host", "127.0.0.1", "--port", str(port), "--outputs", str(root / "outputs"),
        "--repository-dir", str(root / "repository"), "--triton-log", str(root / "tritonserver.log"),
        "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
        "--triton-metrics-port", str(free_port()),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Service(process, f"http://127.0.0.1:{port}", root / "outputs", root / "repository", log, golden_ckpt)
    try:
        wait_for(lambda: served.healthy() or process.poll() is not None, START_TIMEOUT_S, what="the service")
        assert process.poll() is None, served.log_tail()
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in pids_with(str(served.repository)):
            os.kill(pid, signal.SIGKILL)


def assert_generates(service: Service, timeout_s: float = RECOVERY_TIMEOUT_S) -> httpx.Response:
    """The service's answer with audio to the short request, within `timeout_s` (503s while it recovers)."""
    def answered():
        response = service.generate()
        assert response is None or response.status_code in (200, 503), (response.status_code, response.text)
        return response is not None and response.status_code == 200 and response

    return wait_for(answered, timeout_s, every_s=1.0, what="a generation")


def audio(response: httpx.Response):
    return soundfile.read(io.BytesIO(response.content), dtype="float32")[0]


def assert_retry_later(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert int(response.headers["Retry-After"]) >= 1 and response.json()["detail"]


def test_a_killed_dit_step_stub_is_reported_and_recovers(service):
    before = assert_generates(service)
    os.kill(service.stub_pid("dit_step"), signal.SIGKILL)
    # A request sent right after the kill either waits through the recovery or is told to retry later.
    answers: list[httpx.Response | None] = []
    during = threading.Thread(target=lambda: answers.append(service.generate()))
    during.start()

    def reported():  # /health tells the truth: not ready, naming the model
        answer = service.get("/health")
        return answer is not None and answer.status_code == 503 and "dit_step" in answer.json()["detail"]

    wait_for(reported, 30.0, every_s=0.1, what="/health to name dit_step")
    wait_for(service.healthy, RECOVERY_TIMEOUT_S, what="/health healthy again")
    during.join(timeout=RECOVERY_TIMEOUT_S)
    (answer,) = answers
    assert answer is not None and answer.status_code in (200, 503), answer.text if answer else service.log_tail()
    if answer.status_code == 503:
        assert_retry_later(answer)
    response = service.generate()
    assert response is not None and response.status_code == 200, service.log_tail()
    # dit_step's condition cache died with its stub: nothing stale is used, the same request gives the same audio
    assert np.array_equal(audio(response), audio(before))
    assert service.process.poll() is None


def test_c_tritonserver_killed_is_restarted_while_the_gateway_answers_503(service):
    assert_generates(service)
    old = service.triton_pid()
    os.kill(old, signal.SIGKILL)
    time.sleep(1.0)
    assert service.process.poll() is None, service.log_tail()
    health = service.get("/health")
    assert health is not None and health.status_code == 503 and health.json()["status"] == "unhealthy"
    refused = service.generate(timeout=30.0)
    assert refused is not None, service.log_tail()
    assert_retry_later(refused)
    wait_for(service.healthy, RECOVERY_TIMEOUT_S, what="tritonserver restarted")
    assert service.triton_pid() != old
    response = service.generate()
    assert response is not None and response.status_code == 200, service.log_tail()
    assert f"tritonserver exited with code {-signal.SIGKILL}" in service.log.read_text()  # logged with its tail


def test_b_sigterm_lets_running_generations_finish_then_exits_0(service):
    """A /generate and a job run when SIGTERM comes, a third job waits in the queue."""
    assert_generates(service)
    steps = 20  # seconds on the tiny checkpoint (minutes on a loaded machine: the deadline is generous)
    answers: list[httpx.Response | None] = []
    waiting = threading.Thread(target=lambda: answers.append(
        service.generate(infer_step=steps, output_path="drained.wav")))
    waiting.start()
    job = httpx.post(service.url + "/jobs", json=short_request(service.checkpoint, infer_step=steps,
                                                               output_path="drained_job.wav")).json()
    queued = httpx.post(service.url + "/jobs", json=short_request(service.checkpoint, output_path="later.wav")).json()

    def both_running():
        page = service.get("/jobs?limit=3")
        jobs = page.json()["jobs"] if page is not None and page.status_code == 200 else []
        return sum(j["state"] == "running" and j["step"] >= 1 for j in jobs) == 2

    wait_for(both_running, 120.0, what="two generations to run")
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = service.generate(timeout=30.0)
    assert refused is None or refused.status_code == 503, refused.text
    waiting.join(timeout=900)
    (answer,) = answers
    assert answer is not None and answer.status_code == 200, (answer and answer.text, service.log_tail())
    assert (service.outputs / "drained.wav").read_bytes() == answer.content and audio(answer).shape[1] == 2
    assert service.process.wait(timeout=900) == 0, service.log_tail()
    assert not pids_with("bin/tritonserver", str(service.repository))
    with sqlite3.connect(service.outputs / ".jobs.sqlite3") as db:
        states = dict(db.execute("SELECT id, state FROM jobs WHERE id IN (?, ?)", (job["id"], queued["id"])))
    assert states == {job["id"]: "succeeded", queued["id"]: "queued"}
    assert soundfile.info(service.outputs / "drained_job.wav").frames > 0
