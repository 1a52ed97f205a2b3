"""Jobs against the real stack: submit, events, cancel, backpressure, deadline, restart, disconnect.

Every test talks to the session's real tritonserver (conftest `acestep_triton_server`, the tiny
checkpoint on CPU) through the real gateway. The module's gateway runs one generation at a time
(max_running_jobs=1) with room for three (max_pending_jobs=3), so queue positions and the bound are
exact. Whether the loop stopped is read from Triton's own metrics: the count of `dit_step` requests.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import uvicorn
from fastapi.testclient import TestClient

from gateway import Settings, create_app
from gateway.jobs import DISCONNECT_REASON, RESTART_REASON
from tests.rest_requests import short_request

FINAL = {"succeeded", "failed", "cancelled"}
LONG_STEPS = 300  # a generation that runs for many seconds on the tiny checkpoint, cancelled by the tests


def parse_sse(text: str) -> list[dict]:
    """Events of a text/event-stream body: id, event, data (parsed JSON); comments dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def dit_steps_done(server) -> int:
    """Triton's count of finished dit_step requests (each is one loop step of one generation)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r'^nv_inference_request_success\{model="dit_step",version="1"\} (\d+)', text, re.M)
    assert found, "no dit_step metrics"
    return int(found.group(1))


def wait_for(predicate, timeout_s: float = 120.0, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)


def settings_for(server, checkpoint: Path, outputs: Path, **overrides) -> Settings:
    values = dict(
        checkpoint_path=str(checkpoint),
        triton_url=server.grpc_url,
        outputs_dir=outputs,
        max_running_jobs=1,
        max_pending_jobs=3,
    )
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def gateway(acestep_triton_server, tiny_checkpoint, tmp_path_factory):
    outputs = tmp_path_factory.mktemp("jobs-outputs")
    with TestClient(create_app(settings_for(acestep_triton_server, tiny_checkpoint, outputs))) as client:
        yield client


@pytest.fixture(scope="module")
def finished_job(gateway, tiny_checkpoint):
    """One job run to the end, with its whole event stream."""
    submitted = gateway.post("/jobs", json=short_request(tiny_checkpoint, output_path="job.wav"))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    stream = gateway.get(job["links"]["events"])
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    return job, parse_sse(stream.text)


def test_events_are_numbered_monotone_and_end_with_the_final_state(finished_job):
    job, events = finished_job
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    states = [e["data"]["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    assert [e["event"] for e in events[:-1]] == ["progress"] * (len(events) - 1) and events[-1]["event"] == "succeeded"
    progress = [e["data"]["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    steps = [e["data"]["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 4
    # the loop itself reports: one event per step, then the decoders
    diffusion = [e["data"]["step"] for e in events if e["data"]["stage"] == "diffusion"]
    assert diffusion == [0, 1, 2, 3, 4]
    stages = [e["data"]["stage"] for e in events]
    assert stages.index("vocoder") > stages.index("dcae_decoder") > stages.index("diffusion")
    last = events[-1]["data"]
    assert last["id"] == job["id"] and last["files"] == ["job.wav"] and last["links"]["downloads"] == ["/download/job.wav"]
    assert last["seeds"] == [1234567890] and last["eta_s"] == 0.0 and last["timings"]["total"] > 0


def test_events_resume_after_last_event_id_without_duplicates(gateway, finished_job):
    job, events = finished_job
    resumed = parse_sse(gateway.get(job["links"]["events"], headers={"Last-Event-ID": "2"}).text)
    assert resumed == events[2:]
    assert parse_sse(gateway.get(job["links"]["events"], headers={"Last-Event-ID": events[-1]["id"]}).text) == []


def test_job_result_equals_generate_for_the_same_request(gateway, finished_job, tiny_checkpoint):
    job, _ = finished_job
    status = gateway.get(f"/jobs/{job['id']}").json()
    assert status["state"] == "succeeded" and status["queue_position"] == 0
    from_job = gateway.get(status["links"]["downloads"][0])
    generated = gateway.post("/generate", json=short_request(tiny_checkpoint, output_path="sync.wav"))
    assert generated.status_code == 200, generated.text
    assert gateway.get(f"/jobs/{generated.headers['X-Job-Id']}").json()["state"] == "succeeded"
    decoded = [soundfile.read(io.BytesIO(r.content), dtype="float32")[0] for r in (from_job, generated)]
    assert np.array_equal(decoded[0], decoded[1])
    sidecar = gateway.get("/download/job_input_params.json").json()
    assert sidecar["job_id"] == job["id"] and sidecar["format"]["format"] == "wav"


def test_idempotency_key_returns_the_same_job(gateway, tiny_checkpoint):
    headers = {"Idempotency-Key": "retry-me-1"}
    first = gateway.post("/jobs", json=short_request(tiny_checkpoint, infer_step=2), headers=headers)
    again = gateway.post("/jobs", json=short_request(tiny_checkpoint, infer_step=2), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers and first.headers["Location"] == f"/jobs/{first.json()['id']}"
    parse_sse(gateway.get(first.json()["links"]["events"]).text)  # let it finish before the next test


def test_unknown_job_is_404_and_cancelling_a_finished_job_is_409(gateway, finished_job):
    job, _ = finished_job
    for method, url in (("GET", "/jobs/nope"), ("GET", "/jobs/nope/events"), ("DELETE", "/jobs/nope")):
        response = gateway.request(method, url)
        assert response.status_code == 404 and response.json()["detail"].startswith("job_id"), (method, url)
    conflict = gateway.delete(f"/jobs/{job['id']}")
    assert conflict.status_code == 409 and "succeeded" in conflict.json()["detail"]


def test_jobs_list_is_newest_first_and_paginated(gateway, finished_job):
    first = gateway.get("/jobs", params={"limit": 1}).json()
    assert len(first["jobs"]) == 1 and first["next"]
    second = gateway.get(first["next"]).json()
    assert second["jobs"][0]["created_at"] < first["jobs"][0]["created_at"]
    every = gateway.get("/jobs", params={"limit": 100}).json()
    assert finished_job[0]["id"] in [j["id"] for j in every["jobs"]] and every["next"] is None
    assert gateway.get("/jobs", params={"limit": 0}).status_code == 400


def test_cancel_mid_loop_stops_within_a_step_and_writes_nothing(gateway, acestep_triton_server, tiny_checkpoint):
    before = dit_steps_done(acestep_triton_server)
    job = gateway.post("/jobs", json=short_request(tiny_checkpoint, infer_step=LONG_STEPS, output_path="never.wav")).json()
    first = wait_for(lambda: (n := dit_steps_done(acestep_triton_server)) >= before + 2 and n)
    started = time.monotonic()
    running = wait_for(lambda: (n := dit_steps_done(acestep_triton_server)) >= first + 3 and n)
    step_s = (time.monotonic() - started) / (running - first)
    cancelled = gateway.delete(f"/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    at_cancel = dit_steps_done(acestep_triton_server)
    # The step in flight may finish, and the stopped loop sends dit_step one request releasing the
    # conditions it holds (acestep_triton.condition_cache): two requests at most, then nothing more,
    # however long we look.
    time.sleep(max(10 * step_s, 2.0))
    assert dit_steps_done(acestep_triton_server) <= at_cancel + 2
    assert not (Path(gateway.app.state.store.root) / "never.wav").exists()
    assert not (Path(gateway.app.state.store.root) / "never_input_params.json").exists()
    events = parse_sse(gateway.get(job["links"]["events"]).text)
    assert events[-1]["event"] == "cancelled" and events[-1]["data"]["error"]
    assert 3 <= events[-1]["data"]["step"] < LONG_STEPS and events[-1]["data"]["stage"] == "diffusion"


def test_past_the_bound_jobs_and_generate_answer_429_with_retry_after(gateway, tiny_checkpoint):
    long = short_request(tiny_checkpoint, infer_step=LONG_STEPS)
    ids = [gateway.post("/jobs", json=long).json()["id"] for _ in range(3)]
    try:
        assert [gateway.get(f"/jobs/{i}").json()["queue_position"] for i in ids[1:]] == [1, 2]
        # earlier jobs measured the step time: every pending job has an ETA, later ones later
        etas = [gateway.get(f"/jobs/{i}").json()["eta_s"] for i in ids]
        assert all(eta > 0 for eta in etas) and etas == sorted(etas)
        for refused in (gateway.post("/jobs", json=long), gateway.post("/generate", json=long)):
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1 and "limit" in refused.json()["detail"]
    finally:
        for job_id in reversed(ids):
            assert gateway.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
    assert gateway.post("/jobs", json=short_request(tiny_checkpoint, infer_step=1)).status_code == 202


def test_past_the_deadline_generate_answers_504_and_the_job_fails(acestep_triton_server, tiny_checkpoint, tmp_path):
    settings = settings_for(acestep_triton_server, tiny_checkpoint, tmp_path, job_deadline_s=1.5)
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        response = client.post("/generate", json=short_request(tiny_checkpoint, infer_step=LONG_STEPS))
        assert response.status_code == 504 and "deadline" in response.json()["detail"]
        assert time.monotonic() - started < 10
        job = client.get(f"/jobs/{response.headers['X-Job-Id']}").json()
        assert job["state"] == "failed" and "deadline" in job["error"]
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


def test_restart_runs_the_queued_job_and_fails_the_running_one(acestep_triton_server, tiny_checkpoint, tmp_path):
    settings = settings_for(acestep_triton_server, tiny_checkpoint, tmp_path)
    with TestClient(create_app(settings)) as before:
        running = before.post("/jobs", json=short_request(tiny_checkpoint, infer_step=LONG_STEPS)).json()
        queued = before.post("/jobs", json=short_request(tiny_checkpoint, output_path="after.wav")).json()
        wait_for(lambda: before.get(f"/jobs/{running['id']}").json()["state"] == "running")
        assert before.get(f"/jobs/{queued['id']}").json()["state"] == "queued"
    with TestClient(create_app(settings)) as after:
        failed = after.get(f"/jobs/{running['id']}").json()
        assert failed["state"] == "failed" and failed["error"] == RESTART_REASON
        events = parse_sse(after.get(queued["links"]["events"]).text)
        assert events[-1]["event"] == "succeeded" and events[-1]["data"]["files"] == ["after.wav"]
        assert after.get("/download/after.wav").status_code == 200


def test_a_client_leaving_generate_cancels_its_generation(acestep_triton_server, tiny_checkpoint, tmp_path):
    settings = settings_for(acestep_triton_server, tiny_checkpoint, tmp_path)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and server.servers)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/generate", json=short_request(tiny_checkpoint, infer_step=LONG_STEPS), timeout=3.0)
        job = httpx.get(f"{base}/jobs", params={"limit": 1}).json()["jobs"][0]
        job = wait_for(lambda: (j := httpx.get(f"{base}/jobs/{job['id']}").json())["state"] in FINAL and j)
        assert job["state"] == "cancelled" and job["error"] == DISCONNECT_REASON
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_stream_model_reports_every_stage_and_step_and_ends_with_the_ensembles_answer(acestep_triton_server):
    """`acestep_stream` straight over gRPC: progress responses in pipeline order, every step once, and a
    final answer equal to the `acestep` ensemble's for the same request."""
    import tritonclient.grpc as grpcclient

    from acestep_triton.contract import ENSEMBLE_NAME, GenerationParams
    from acestep_triton.ensemble_client import infer_inputs
    from tests.stream_client import stream_responses

    params = GenerationParams(prompt="pop", lyrics="[verse]\nla la", audio_duration=3.0, infer_step=3,
                              actual_seeds=(7,))
    *reports, result = stream_responses(acestep_triton_server.grpc_url, infer_inputs(grpcclient, params))
    assert not isinstance(result, Exception), result
    progress = [(r.as_numpy("STAGE")[0].decode(), int(r.as_numpy("STEP")[0]), int(r.as_numpy("STEPS")[0]))
                for r in reports]
    client = grpcclient.InferenceServerClient(acestep_triton_server.grpc_url)
    try:
        direct = client.infer(ENSEMBLE_NAME, infer_inputs(grpcclient, params), client_timeout=300)
    finally:
        client.close()
    assert progress == [("preprocess", 0, 3), ("text_encoder", 0, 3), ("condition_encoder", 0, 3),
                        ("diffusion", 0, 3), ("diffusion", 1, 3), ("diffusion", 2, 3), ("diffusion", 3, 3),
                        ("dcae_decoder", 3, 3), ("vocoder", 3, 3)]
    assert np.array_equal(result.as_numpy("WAVEFORM"), direct.as_numpy("WAVEFORM"))
    assert result.as_numpy("SEEDS").tolist() == [7] and result.as_numpy("TIME_DIFFUSION") is not None


def test_http_mode_runs_jobs_through_the_ensemble_without_step_progress(acestep_triton_server, tiny_checkpoint,
                                                                       tmp_path):
    """HTTP reaches the plain ensemble: the job succeeds, its stage goes straight from `generating` to
    writing (no stream, so no steps), and the audio equals the gRPC stream's."""
    settings = settings_for(acestep_triton_server, tiny_checkpoint, tmp_path, triton_protocol="http",
                            triton_url=acestep_triton_server.http_url)
    with TestClient(create_app(settings)) as client:
        job = client.post("/jobs", json=short_request(tiny_checkpoint, infer_step=2, output_path="http.wav")).json()
        events = parse_sse(client.get(job["links"]["events"]).text)
        assert [e["data"]["stage"] for e in events] == ["queued", "generating", "writing", "done"]
        over_http = client.get("/download/http.wav").content
    settings = settings_for(acestep_triton_server, tiny_checkpoint, tmp_path / "grpc")
    with TestClient(create_app(settings)) as client:
        over_grpc = client.post("/generate", json=short_request(tiny_checkpoint, infer_step=2)).content
    assert soundfile.read(io.BytesIO(over_http))[0].tolist() == soundfile.read(io.BytesIO(over_grpc))[0].tolist()


def test_stream_errors_name_their_code_and_the_gateway_reads_it(acestep_triton_server):
    """A gRPC stream error is text only: `acestep_stream` leads it with its Triton code's name, so an
    invalid input is INVALID_ARG over the stream too and the gateway answers 400 rather than 500."""
    import tritonclient.grpc as grpcclient

    from acestep_triton.contract import GenerationParams, parse_stream_error
    from acestep_triton.ensemble_client import infer_inputs
    from gateway.engine import TritonEngine
    from gateway.errors import EngineFailed, EngineRejected, EngineUnavailable
    from tests.stream_client import stream_responses

    inputs = infer_inputs(grpcclient, GenerationParams(prompt="pop", lyrics="", audio_duration=3.0, infer_step=2))
    for tensor in inputs:
        if tensor.name() == "INFER_STEP":
            tensor.set_data_from_numpy(np.array([0], dtype=np.int32))
    error = stream_responses(acestep_triton_server.grpc_url, inputs, timeout_s=120)[-1]
    assert isinstance(error, Exception), "the stream ended with a result"
    code, message = parse_stream_error(error.message())
    assert code == "INVALID_ARG" and message.startswith("infer_step"), error.message()

    for text, raised in ((error.message(), EngineRejected), ("[UNAVAILABLE] out of GPU memory", EngineUnavailable),
                         ("[INTERNAL] internal error", EngineFailed), ("no code at all", EngineFailed)):
        with pytest.raises(raised):
            TritonEngine._raise_for_stream(text)


def test_stream_sends_the_audio_chunk_by_chunk_and_the_chunks_are_the_final_waveform(acestep_triton_server):
    """STREAM_AUDIO: the vocoder's chunks arrive in order as "vocoder" responses, tile the waveform,
    and put together are the final WAVEFORM, which equals the ensemble's one-call decode up to rounding."""
    import tritonclient.grpc as grpcclient

    from acestep_triton.contract import ENSEMBLE_NAME, STREAM_AUDIO, GenerationParams
    from acestep_triton.ensemble_client import audio_chunk, infer_inputs
    from tests.stream_client import stream_responses

    params = GenerationParams(prompt="pop", lyrics="", audio_duration=8.0, infer_step=2, actual_seeds=(3, 4))
    flag = {STREAM_AUDIO.name: np.array([True])}
    *reports, result = stream_responses(acestep_triton_server.grpc_url, infer_inputs(grpcclient, params, flag))
    assert not isinstance(result, Exception), result
    chunks = []
    for report in reports:
        if (chunk := audio_chunk(report)) is not None:
            assert report.as_numpy("STAGE")[0].decode() == "vocoder"
            audio, offset, total = chunk
            chunks.append((offset, audio, total))
    client = grpcclient.InferenceServerClient(acestep_triton_server.grpc_url)
    try:
        direct = client.infer(ENSEMBLE_NAME, infer_inputs(grpcclient, params), client_timeout=300)
    finally:
        client.close()
    final = result.as_numpy("WAVEFORM")
    assert len(chunks) >= 2 and all(total == final.shape[-1] for _, _, total in chunks)
    assert [offset for offset, _, _ in chunks] == list(np.cumsum([0] + [c.shape[-1] for _, c, _ in chunks[:-1]]))
    assert np.array_equal(np.concatenate([c for _, c, _ in chunks], axis=-1), final)
    np.testing.assert_allclose(final, direct.as_numpy("WAVEFORM"), rtol=0, atol=1e-4)


def test_job_audio_streams_while_the_vocoder_decodes_and_equals_the_file(gateway, tiny_checkpoint):
    """The real stack: a job's WAV stream starts (header and the first chunk) while the job still
    runs, and its bytes are the written file's bytes."""
    request = short_request(tiny_checkpoint, audio_duration=8.0, infer_step=2, output_path="streamed.wav")
    job = gateway.post("/jobs", json=request).json()
    received, states = [], []
    with gateway.stream("GET", f"/jobs/{job['id']}/audio") as streamed:
        assert streamed.status_code == 200
        for chunk in streamed.iter_bytes():
            if not received:
                states.append(gateway.get(f"/jobs/{job['id']}").json()["state"])
            received.append(chunk)
    assert states == ["running"], "the first bytes came only after the job ended"
    assert b"".join(received) == gateway.get("/download/streamed.wav").content
