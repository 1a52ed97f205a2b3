"""The gateway's side of reliability, fast (no server): readiness and recovery, shutdown's drain,
request ids, the body bound, security headers, CORS, a full outputs disk.

`ScriptedEngine` plays Triton: its readiness, its probes and each generation are set by the test.
The real thing (a killed stub, a killed tritonserver, SIGTERM) is in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from acestep_triton.contract import GenerationParams, GenerationResult
from gateway import Settings, create_app
from gateway.engine import Readiness
from gateway.errors import EngineFailed
from gateway.health import HealthMonitor
from gateway.outputs import OutputStore
from tests.test_gateway import SERVED_CHECKPOINT, ToneEngine, payload

DEAD_STUB = "failed a probe: Stub process 'dit_step_0_0' is not healthy."


class ScriptedEngine(ToneEngine):
    """ToneEngine whose readiness and probe answers the test sets, and whose generations can be held
    (`gate` cleared) or fail once with `fail_next`."""

    def __init__(self) -> None:
        super().__init__()
        self.readiness = Readiness(True)
        self.probe_failures: dict[str, str] = {}
        self.probed: list[list[str] | None] = []
        self.fail_next: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.started = 0

    async def ready(self) -> Readiness:
        return self.readiness

    async def probe(self, models=None) -> dict[str, str]:
        self.probed.append(None if models is None else sorted(models))
        return {m: why for m, why in self.probe_failures.items() if models is None or m in models}

    async def generate(self, params: GenerationParams, progress=None, source=None, stream_audio=False,
                       request_id: str = "") -> GenerationResult:
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return await super().generate(params, progress, source, stream_audio, request_id)


def settings_for(tmp_path: Path, **overrides) -> Settings:
    values = dict(checkpoint_path=SERVED_CHECKPOINT, outputs_dir=tmp_path / "outputs", health_interval_s=0.05,
                  recovery_estimate_s=7.0)
    return Settings(**(values | overrides))


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def client(tmp_path, engine):
    with TestClient(create_app(settings_for(tmp_path), engine)) as client:
        yield client


def run_in_app(client: TestClient, coroutine_function, *args):
    """Run an async function on the app's event loop (the TestClient's portal)."""
    return client.portal.call(coroutine_function, *args)


# ---- readiness, liveness, outages --------------------------------------------------------------------


def test_health_names_each_model_that_cannot_serve_and_liveness_stays_up(client, engine):
    assert client.get("/health").json() == {"status": "healthy"}
    engine.readiness = Readiness.of({"dit_step": "UNLOADING", "acestep": "UNAVAILABLE (unloaded)"})
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert health.json()["models"] == {"dit_step": "UNLOADING", "acestep": "UNAVAILABLE (unloaded)"}
    assert health.json()["detail"] == "acestep: UNAVAILABLE (unloaded); dit_step: UNLOADING"
    assert 1 <= int(health.headers["Retry-After"]) <= 7  # the estimate, before any outage was measured
    assert client.get("/health/live").json() == {"status": "alive"}


def test_during_an_outage_generate_answers_503_and_jobs_wait_for_the_recovery(client, engine):
    engine.readiness = Readiness(False, "Triton at x is unreachable")
    wait_for(lambda: client.get("/health").status_code == 503)
    refused = client.post("/generate", json=payload())
    assert refused.status_code == 503 and "unreachable" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    job = client.post("/jobs", json=payload()).json()
    time.sleep(0.3)  # several health checks
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "queued" and engine.started == 0
    engine.readiness = Readiness(True)
    wait_for(lambda: client.get(f"/jobs/{job['id']}").json()["state"] == "succeeded")
    outages = client.app.state.health.outages
    assert len(outages) == 1 and outages[0] >= 0.3


def test_a_generation_cut_off_by_a_dead_model_runs_again_once_it_is_back(client, engine):
    """The stub died under the request: the generation fails, the probes find dit_step dead,
    the job waits in the queue while dit_step is suspect, and runs again once its probe passes."""
    engine.fail_next = EngineFailed("Triton failed: dit_step: Stub process 'dit_step_0_0' is not healthy.")
    engine.probe_failures = {"dit_step": DEAD_STUB}
    job = client.post("/jobs", json=payload(output_path="again.wav")).json()
    health = wait_for(lambda: (h := client.get("/health")).status_code == 503 and h)
    assert health.json()["models"] == {"dit_step": DEAD_STUB}
    assert client.get(f"/jobs/{job['id']}").json()["state"] == "queued"
    assert None in engine.probed and ["dit_step"] in engine.probed  # every model, then the suspect one
    engine.probe_failures = {}
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}").json())["state"] == "succeeded" and j)
    assert engine.started == 2 and done["files"] == ["again.wav"]
    states = [e["state"] for e in (json.loads(line[6:]) for line in client.get(f"/jobs/{job['id']}/events").text
                                   .splitlines() if line.startswith("data: "))]
    runs = [state for i, state in enumerate(states) if i == 0 or state != states[i - 1]]  # progress events aside
    assert runs == ["queued", "running", "queued", "running", "succeeded"]


def test_a_failure_while_everything_is_ready_is_not_retried(client, engine):
    engine.fail_next = EngineFailed("Triton failed: something of its own")
    response = client.post("/generate", json=payload())
    assert response.status_code == 500 and engine.started == 1 and engine.probed == [None]


async def _outage(monitor: HealthMonitor, engine: ScriptedEngine, seconds: float) -> float:
    engine.readiness = Readiness(False, "down")
    await monitor.check()
    await asyncio.sleep(seconds)
    retry_after = monitor.retry_after_s()
    engine.readiness = Readiness(True)
    await monitor.check()
    return retry_after


def test_the_recovery_time_is_measured_and_promised():
    engine = ScriptedEngine()
    monitor = HealthMonitor(engine, interval_s=1.0, recovery_estimate_s=30.0)
    asyncio.run(monitor.check())
    assert monitor.ready and monitor.outages == []  # start-up is not an outage
    assert asyncio.run(_outage(monitor, engine, 0.2)) == 30  # 30 s estimated, 0.2 s spent: ceil(29.8)
    assert monitor.outages[0] == pytest.approx(0.2, abs=0.1)
    engine.readiness = Readiness(False, "down")
    asyncio.run(monitor.check())
    assert monitor.retry_after_s() == 1  # the measured 0.2 s, never below 1


# ---- shutdown ----------------------------------------------------------------------------------------


def test_drain_refuses_new_work_lets_the_running_job_finish_and_keeps_the_queued_one(tmp_path, engine):
    with TestClient(create_app(settings_for(tmp_path, max_running_jobs=1, shutdown_deadline_s=30.0), engine)) as client:
        engine.gate = run_in_app(client, _event)
        running = client.post("/jobs", json=payload(output_path="running.wav")).json()
        queued = client.post("/jobs", json=payload(output_path="queued.wav")).json()
        wait_for(lambda: engine.started == 1)
        drain = client.portal.start_task_soon(client.app.state.drain)
        wait_for(lambda: client.app.state.jobs.draining)
        refused = client.post("/generate", json=payload())
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.post("/jobs", json=payload()).status_code == 503
        assert client.get("/health").json() == {"status": "unhealthy", "detail": "the gateway is shutting down"}
        client.portal.call(engine.gate.set)
        drain.result(timeout=10)
        assert client.get(f"/jobs/{running['id']}").json()["state"] == "succeeded"
        assert client.get(f"/jobs/{queued['id']}").json()["state"] == "queued" and engine.started == 1
        assert (tmp_path / "outputs" / "running.wav").is_file()


def test_drain_fails_what_outlives_the_deadline_and_the_waiting_generate(tmp_path, engine):
    with TestClient(create_app(settings_for(tmp_path, max_running_jobs=1, shutdown_deadline_s=0.2), engine)) as client:
        engine.gate = run_in_app(client, _event)
        running = client.post("/jobs", json=payload()).json()
        wait_for(lambda: engine.started == 1)
        waiting = client.portal.start_task_soon(_post, client, "/generate", payload())
        wait_for(lambda: len(client.get("/jobs").json()["jobs"]) == 2)
        client.portal.call(client.app.state.drain)
        stopped = client.get(f"/jobs/{running['id']}").json()
        assert stopped["state"] == "failed" and "shutdown deadline" in stopped["error"]
        answer = waiting.result(timeout=10)
        assert answer.status_code == 503 and "did not start" in answer.json()["detail"]


async def _event() -> asyncio.Event:
    return asyncio.Event()


async def _post(client: TestClient, path: str, body: dict):
    return await asyncio.to_thread(client.post, path, json=body)


# ---- request ids ---------------------------------------------------------------------------------------


def test_request_id_is_taken_or_made_and_follows_the_job(client, engine):
    response = client.post("/generate", json=payload(output_path="ided.wav"), headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123" and engine.request_ids == ["abc-123"]
    assert client.get(f"/jobs/{response.headers['X-Job-Id']}").json()["request_id"] == "abc-123"
    assert client.get("/download/ided_input_params.json").json()["request_id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-ID": "no spaces allowed"}).headers["X-Request-ID"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert client.get("/nowhere").headers["X-Request-ID"] != made


# ---- security ------------------------------------------------------------------------------------------


def test_bodies_over_the_bound_answer_413_before_the_app_reads_them(tmp_path, engine):
    with TestClient(create_app(settings_for(tmp_path, max_body_bytes=2000), engine)) as client:
        big = payload(lyrics="la " * 1000)
        response = client.post("/generate", json=big)
        assert response.status_code == 413 and "2000 bytes" in response.json()["detail"]
        chunked = client.post("/jobs", content=iter([json.dumps(big).encode()]),
                              headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and engine.started == 0
        small = client.post("/generate", content=iter([json.dumps(payload()).encode()]),
                            headers={"Content-Type": "application/json"})
        assert small.status_code == 200, small.text


def test_security_headers_everywhere_and_the_docs_may_load_their_script(client):
    for response in (client.get("/health"), client.get("/nowhere"), client.post("/generate", json={})):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert "Content-Security-Policy" not in client.get("/docs").headers


def test_cors_is_closed_unless_origins_are_named(tmp_path, engine):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(settings_for(tmp_path), engine)) as client:
        assert "access-control-allow-origin" not in client.options("/generate", headers=preflight).headers
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://a.example"}).headers
    with TestClient(create_app(settings_for(tmp_path, cors_origins=("https://app.example",)), engine)) as client:
        allowed = client.get("/health", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in client.options("/generate", headers=preflight).headers


def test_the_api_key_is_compared_in_constant_time(tmp_path, engine, monkeypatch):
    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    with TestClient(create_app(settings_for(tmp_path, api_key="s3cret"), engine)) as client:
        assert client.post("/generate", json=payload(), headers={"X-API-Key": "guess"}).status_code == 401
        assert client.post("/generate", json=payload(), headers={"X-API-Key": "s3cret"}).status_code == 200
    assert compared == [(b"guess", b"s3cret"), (b"s3cret", b"s3cret")]


# ---- a full disk -------------------------------------------------------------------------------------------


def test_a_full_outputs_disk_answers_507_and_keeps_nothing(client, monkeypatch):
    written = []
    real_write = OutputStore.write_bytes

    def fill_up(store, name, data):
        if written:  # the first item fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        return real_write(store, name, data)

    monkeypatch.setattr(OutputStore, "write_bytes", fill_up)
    response = client.post("/generate", json=payload(actual_seeds=[1, 2], output_path="full.wav"))
    assert response.status_code == 507 and "no space left" in response.json()["detail"]
    assert written == ["full.wav"]
    assert not [p for p in Path(client.app.state.store.root).iterdir() if not p.name.startswith(".")]
