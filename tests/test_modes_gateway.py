"""The other tasks over REST: their fields, the uploads API, source audio by name, retake seeds.

Runs the real app with tests/test_gateway.py's `ToneEngine`, a stand-in GenerationEngine that
records the parameters and source audio it receives (no server starts): what is checked here is the
gateway's side, that a good request reaches the engine intact and a bad one never does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from acestep_triton.contract import (
    AUDIO2AUDIO,
    ENSEMBLE_INPUTS,
    MAX_DURATION_S,
    TASK_FIELDS,
    TASKS,
    GenerationParams,
    ParameterError,
    SourceAudio,
)
from acestep_triton.ensemble_client import input_arrays
from gateway import create_app
from gateway.errors import EngineRejected
from gateway.schema import GATEWAY_FIELDS, SOURCE_FIELDS
from gateway.settings import Settings, SettingsError
from tests.test_gateway import REPO_ROOT, ToneEngine, payload, settings_for

UPLOAD = "<the upload>"  # replaced by the module upload's name (1 s)
LONG = "<a long upload>"  # replaced by a 239.5 s upload's name
OUTPUT = "<an output>"  # replaced by the name of an earlier output's audio
SIDECAR = "<a sidecar>"  # replaced by that output's JSON sidecar


def audio_bytes(seconds: float, rate: int, channels: int, file_format: str = "WAV", subtype: str = "PCM_16") -> bytes:
    """Noise in a file of that format (what a client would upload)."""
    noise = np.random.default_rng(rate + channels).uniform(-0.3, 0.3, (round(seconds * rate), channels))
    data = io.BytesIO()
    soundfile.write(data, noise.astype(np.float32), rate, format=file_format, subtype=subtype)
    return data.getvalue()


def post_upload(client: TestClient, data: bytes, filename: str = "song.wav", field: str = "file"):
    return client.post("/uploads", files={field: (filename, data, "application/octet-stream")})


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def window(**changes) -> dict:
    """A repaint of 0.2-0.6 s of the module's upload."""
    return {"task": "repaint", "src_audio_path": UPLOAD, "repaint_start": 0.2, "repaint_end": 0.6} | changes


def audio2audio(**changes) -> dict:
    return {"audio2audio_enable": True, "ref_audio_input": UPLOAD} | changes


# ---- uploads -------------------------------------------------------------------------------------------

GOOD_UPLOADS = [
    ("wav-44.1k-stereo", "WAV", "PCM_16", 44100, 2),
    ("wav-48k-mono-float", "WAV", "FLOAT", 48000, 1),
    ("flac-48k-stereo", "FLAC", "PCM_24", 48000, 2),
    ("flac-22.05k-mono", "FLAC", "PCM_16", 22050, 1),
    ("ogg-22.05k-stereo", "OGG", "VORBIS", 22050, 2),
    ("mp3-44.1k-mono", "MP3", "MPEG_LAYER_III", 44100, 1),
    ("mp3-48k-stereo", "MP3", "MPEG_LAYER_III", 48000, 2),
]


@pytest.fixture
def tone(tmp_path):
    engine = ToneEngine()
    with TestClient(create_app(settings_for(tmp_path), engine)) as client:
        yield client, engine


@pytest.mark.parametrize("file_format, subtype, rate, channels", [c[1:] for c in GOOD_UPLOADS],
                         ids=[c[0] for c in GOOD_UPLOADS])
def test_upload_is_stored_listed_and_reaches_the_engine_decoded(tone, file_format, subtype, rate, channels):
    client, engine = tone
    data = audio_bytes(1.0, rate, channels, file_format, subtype)
    answer = post_upload(client, data, filename="../../etc/passwd")  # the client's file name is never used
    assert answer.status_code == 201, answer.text
    stored = answer.json()
    assert re.fullmatch(rf"upload_[0-9a-f]{{32}}\.{file_format.lower()}", stored["name"])
    assert (stored["format"], stored["sample_rate"], stored["channels"]) == (file_format, rate, channels)
    assert stored["duration"] == pytest.approx(1.0, abs=0.06) and stored["size"] == len(data)
    uploads = Path(client.app.state.uploads.root)
    assert files_in(uploads) == [stored["name"]] and (uploads / stored["name"]).read_bytes() == data
    assert client.get("/uploads").json() == {"uploads": [stored]}

    response = client.post("/generate", json=payload(**window(src_audio_path=stored["name"])))
    assert response.status_code == 200, response.text
    expected, expected_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    source = engine.sources[-1]
    assert source.sample_rate == expected_rate == rate and source.samples.dtype == np.float32
    assert source.samples.shape == (channels, expected.shape[0]) and np.array_equal(source.samples, expected.T)


BAD_UPLOADS = [
    ("not-audio", b"this is not audio at all\n" * 200, "file", "not audio"),
    ("empty", b"", "file", "is empty"),
    ("no-samples", audio_bytes(0.0, 44100, 2), "file", "no samples"),
    ("three-channels", audio_bytes(0.5, 22050, 3), "file", "3 channels"),
    ("too-long", audio_bytes(MAX_DURATION_S + 1, 1000, 1), "file", f"longer than {MAX_DURATION_S:g} s"),
]


@pytest.mark.parametrize("data, field, why", [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_answers_400_and_leaves_nothing(tone, data, field, why):
    client, _ = tone
    answer = post_upload(client, data)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(field) and why in answer.json()["detail"]
    assert files_in(client.app.state.uploads.root) == [] and client.get("/uploads").json() == {"uploads": []}
    assert client.get("/health").json() == {"status": "healthy"}


def boundary_body(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"; filename="x.wav"\r\n\r\n%s\r\n'
                    % (name.encode(), data) for name, data in parts)
    return body + b"--B--\r\n"


@pytest.mark.parametrize(
    "content, content_type",
    [
        (b'{"file": "x"}', "application/json"),
        (boundary_body(("audio", audio_bytes(0.2, 8000, 1))), "multipart/form-data; boundary=B"),
        (boundary_body(("file", audio_bytes(0.2, 8000, 1)), ("file", audio_bytes(0.2, 8000, 1))),
         "multipart/form-data; boundary=B"),
        (b"--B--\r\n", "multipart/form-data; boundary=B"),
        (b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc", "multipart/form-data; boundary=B"),
        (b"garbage without a boundary", "multipart/form-data; boundary=B"),
        (boundary_body(("file", audio_bytes(0.2, 8000, 1))), "multipart/form-data"),
    ],
    ids=["json", "other-field", "two-files", "no-part", "unterminated", "garbage", "no-boundary"],
)
def test_malformed_upload_answers_400_naming_file(tone, content, content_type):
    client, _ = tone
    answer = client.post("/uploads", content=content, headers={"Content-Type": content_type})
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith("file")
    assert files_in(client.app.state.uploads.root) == []


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_upload_over_the_size_limit_answers_413(tmp_path, streamed):
    data = audio_bytes(2.0, 44100, 2)  # ~350 kB
    with TestClient(create_app(settings_for(tmp_path, max_upload_bytes=100_000), ToneEngine())) as client:
        body = boundary_body(("file", data))
        # a generator body goes out chunked, without Content-Length: the limit is enforced while streaming
        content = (body[i:i + 8192] for i in range(0, len(body), 8192)) if streamed else body
        answer = client.post("/uploads", content=content, headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert answer.status_code == 413, answer.text
        assert answer.json()["detail"] == "file: larger than 100000 bytes"
        assert files_in(client.app.state.uploads.root) == []
        assert post_upload(client, audio_bytes(0.5, 22050, 1)).status_code == 201  # ~22 kB still fits


def test_upload_length_limit_is_a_setting(tmp_path):
    with TestClient(create_app(settings_for(tmp_path, max_upload_s=2.0), ToneEngine())) as client:
        assert post_upload(client, audio_bytes(1.9, 8000, 1)).status_code == 201
        refused = post_upload(client, audio_bytes(2.1, 8000, 1))
        assert refused.status_code == 400 and refused.json()["detail"] == "file: is longer than 2 s"


def test_upload_settings_from_environment(tmp_path):
    env = {"ACESTEP_CHECKPOINT_PATH": "/ckpt", "ACESTEP_OUTPUTS_DIR": str(tmp_path / "out")}
    defaults = Settings.from_env(env)
    assert defaults.uploads_dir == tmp_path / "out" / ".uploads"
    assert (defaults.max_upload_bytes, defaults.max_upload_s, defaults.upload_retention_s) == (64 * 2**20, 240.0, 86400.0)
    chosen = Settings.from_env(env | {"ACESTEP_UPLOADS_DIR": "/srv/up", "ACESTEP_MAX_UPLOAD_BYTES": "1000",
                                      "ACESTEP_MAX_UPLOAD_S": "30", "ACESTEP_UPLOAD_RETENTION_S": "60"})
    assert (chosen.uploads_dir, chosen.max_upload_bytes, chosen.max_upload_s, chosen.upload_retention_s) == (
        Path("/srv/up"), 1000, 30.0, 60.0)
    for bad, match in (({"ACESTEP_MAX_UPLOAD_S": "241"}, "max_upload_s"),
                       ({"ACESTEP_MAX_UPLOAD_BYTES": "0"}, "max_upload_bytes"),
                       ({"ACESTEP_UPLOAD_RETENTION_S": "x"}, "ACESTEP_UPLOAD_RETENTION_S")):
        with pytest.raises(SettingsError, match=match):
            Settings.from_env(env | bad)


def test_uploads_need_the_api_key_when_configured(tmp_path):
    with TestClient(create_app(settings_for(tmp_path, api_key="s3cret"), ToneEngine())) as client:
        data = audio_bytes(0.5, 22050, 1)
        assert post_upload(client, data).status_code == 401
        assert files_in(client.app.state.uploads.root) == []
        assert client.get("/uploads").status_code == 401
        key = {"X-API-Key": "s3cret"}
        name = client.post("/uploads", files={"file": ("a.wav", data)}, headers=key).json()["name"]
        assert client.delete(f"/uploads/{name}").status_code == 401
        assert client.delete(f"/uploads/{name}", headers=key).status_code == 204


@pytest.mark.parametrize(
    "raw_path",
    [
        "/uploads/..",
        "/uploads/..%2F..%2Fsecret.txt",
        "/uploads/%2e%2e%2fsecret.txt",
        "/uploads/%2Fetc%2Fpasswd",
        "/uploads/..%5Csecret.txt",
        "/uploads/escape.wav",
        "/uploads/.tmp-partial.part",
        "/uploads/missing.wav",
        "/uploads/sub",
    ],
)
def test_delete_upload_refuses_traversal(tmp_path, raw_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    with TestClient(create_app(settings_for(tmp_path), ToneEngine())) as client:
        uploads = client.app.state.uploads.root
        (uploads / "escape.wav").symlink_to(secret)
        (uploads / ".tmp-partial.part").write_text("half")
        (uploads / "sub").mkdir()
        before = files_in(uploads)
        answer = client.delete(raw_path)
        assert answer.status_code in (400, 404), (raw_path, answer.status_code)
        assert list(answer.json()) == ["detail"]
        assert secret.read_text() == "top secret" and files_in(uploads) == before


# ---- the bad-input table of the other tasks (one module app; nothing may reach the engine) ---------------


@pytest.fixture(scope="module")
def module_app(tmp_path_factory):
    """One app with an upload and an earlier output (audio and sidecar) in place."""
    engine = ToneEngine()
    with TestClient(create_app(settings_for(tmp_path_factory.mktemp("modes")), engine)) as client:
        upload = post_upload(client, audio_bytes(1.0, 44100, 2)).json()["name"]
        long = post_upload(client, audio_bytes(239.5, 1000, 1)).json()["name"]
        output = client.post("/generate", json=payload(output_path="earlier.wav")).headers["X-Output-Files"]
        names = {UPLOAD: upload, LONG: long, OUTPUT: output, SIDECAR: "earlier_input_params.json"}
        yield client, engine, names


def resolved(changes: dict, names: dict) -> dict:
    return {key: names.get(value, value) if isinstance(value, str) else value for key, value in changes.items()}


MODE_BAD_INPUTS = [
    # ranges and orders (contract.validate)
    ("repaint_end-at-start", window(repaint_start=0.5, repaint_end=0.5), "repaint_end"),
    ("repaint_end-before-start", window(repaint_start=0.5, repaint_end=0.1), "repaint_end"),
    ("repaint_start-negative", window(repaint_start=-1.0), "repaint_start"),
    ("extend-without-window", {"task": "extend", "src_audio_path": UPLOAD}, "repaint_start"),
    # against the source's length (contract.validate_source, before the job is queued)
    ("repaint-window-past-the-source", window(repaint_end=1.5), "repaint_end"),
    ("extend-longer-than-the-source", {"task": "extend", "src_audio_path": UPLOAD, "repaint_start": -2.0},
     "repaint_start"),
    ("extend-result-over-240-s", {"task": "extend", "src_audio_path": LONG, "repaint_start": -2.0}, "repaint_start"),
    ("retake_variance-above-1", {"task": "retake", "retake_variance": 1.5}, "retake_variance"),
    ("retake_variance-below-0", window(retake_variance=-0.1), "retake_variance"),
    ("ref_audio_strength-above-1", audio2audio(ref_audio_strength=1.5), "ref_audio_strength"),
    ("ref_audio_strength-below-0", audio2audio(ref_audio_strength=-0.5), "ref_audio_strength"),
    ("edit_n_min-above-max", {"task": "edit", "src_audio_path": UPLOAD, "edit_n_min": 0.8, "edit_n_max": 0.2},
     "edit_n_min"),
    ("edit_n_max-above-1", {"task": "edit", "src_audio_path": UPLOAD, "edit_n_max": 1.2}, "edit_n_max"),
    ("edit_n_avg-zero", {"task": "edit", "src_audio_path": UPLOAD, "edit_n_avg": 0}, "edit_n_avg"),
    ("lora_weight-above-1", {"lora_weight": 1.5}, "lora_weight"),
    ("lora_weight-negative", {"lora_weight": -0.5}, "lora_weight"),
    ("lora_name_or_path-empty", {"lora_name_or_path": ""}, "lora_name_or_path"),
    ("retake_seeds-range", {"task": "retake", "retake_seeds": [2**32]}, "retake_seeds"),
    ("retake_seeds-type", {"task": "retake", "retake_seeds": "5"}, "retake_seeds"),
    ("edit_n_avg-type", {"task": "edit", "src_audio_path": UPLOAD, "edit_n_avg": 1.5}, "edit_n_avg"),
    ("task-unknown", {"task": "remix"}, "task"),
    ("task-audio2audio-by-name", {"task": "audio2audio", "ref_audio_input": UPLOAD}, "task"),
    # a field the task does not use
    ("unused-retake_variance-text2music", {"retake_variance": 0.2}, "retake_variance"),
    ("unused-retake_seeds-text2music", {"retake_seeds": [5]}, "retake_seeds"),
    ("unused-repaint_start-retake", {"task": "retake", "repaint_start": 1.0}, "repaint_start"),
    ("unused-edit_target_prompt-repaint", window(edit_target_prompt="jazz"), "edit_target_prompt"),
    ("unused-ref_audio_strength-text2music", {"ref_audio_strength": 0.3}, "ref_audio_strength"),
    ("unused-retake_variance-edit", {"task": "edit", "src_audio_path": UPLOAD, "retake_variance": 0.7},
     "retake_variance"),
    ("unused-edit_n_avg-audio2audio", audio2audio(edit_n_avg=2), "edit_n_avg"),
    ("audio2audio_enable-with-a-task", window(audio2audio_enable=True, ref_audio_input=UPLOAD), "audio2audio_enable"),
    ("audio2audio_enable-type", audio2audio(audio2audio_enable="true"), "audio2audio_enable"),
    # the source: missing, unused, unknown, not audio, or a path
    ("source-missing-repaint", window(src_audio_path=None), "src_audio_path"),
    ("source-missing-extend", {"task": "extend", "repaint_start": -1.0}, "src_audio_path"),
    ("source-missing-edit", {"task": "edit"}, "src_audio_path"),
    ("source-missing-audio2audio", audio2audio(ref_audio_input=None), "ref_audio_input"),
    ("source-unused-text2music", {"src_audio_path": UPLOAD}, "src_audio_path"),
    ("source-unused-retake", {"task": "retake", "src_audio_path": UPLOAD}, "src_audio_path"),
    ("source-unused-audio2audio", audio2audio(src_audio_path=UPLOAD), "src_audio_path"),
    ("reference-without-audio2audio", {"ref_audio_input": UPLOAD}, "ref_audio_input"),
    ("reference-with-repaint", window(ref_audio_input=UPLOAD), "ref_audio_input"),
    ("source-unknown", window(src_audio_path="upload_00000000000000000000000000000000.wav"), "src_audio_path"),
    ("source-sidecar-not-audio", window(src_audio_path=SIDECAR), "src_audio_path"),
    ("source-job-database", window(src_audio_path=".jobs.sqlite3"), "src_audio_path"),
    ("source-uploads-folder", window(src_audio_path=".uploads"), "src_audio_path"),
    ("source-empty", window(src_audio_path=""), "src_audio_path"),
    ("source-type", window(src_audio_path=5), "src_audio_path"),
    ("source-parent", window(src_audio_path="../secret.wav"), "src_audio_path"),
    ("source-absolute", window(src_audio_path="/etc/passwd"), "src_audio_path"),
    ("source-subdirectory", window(src_audio_path="sub/x.wav"), "src_audio_path"),
    ("source-backslash", window(src_audio_path="..\\x.wav"), "src_audio_path"),
    ("source-dotdot", window(src_audio_path=".."), "src_audio_path"),
    ("source-dots-inside", window(src_audio_path="a..b.wav"), "src_audio_path"),
    ("reference-absolute", audio2audio(ref_audio_input="/tmp/x.wav"), "ref_audio_input"),
    ("reference-parent", audio2audio(ref_audio_input="../outputs/earlier.wav"), "ref_audio_input"),
]


@pytest.mark.parametrize("route", ["/generate", "/jobs"])
@pytest.mark.parametrize("changes, field", [c[1:] for c in MODE_BAD_INPUTS], ids=[c[0] for c in MODE_BAD_INPUTS])
def test_mode_bad_input_answers_400_naming_the_field(module_app, route, changes, field):
    client, engine, names = module_app
    outputs, uploads = client.app.state.store.root, client.app.state.uploads.root
    before = files_in(outputs), files_in(uploads), len(engine.calls)
    response = client.post(route, json=payload(**resolved(changes, names)))
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["detail"] and response.json()["detail"].startswith(field), response.json()
    assert (files_in(outputs), files_in(uploads), len(engine.calls)) == before  # nothing written, nothing ran
    assert client.get("/health").json() == {"status": "healthy"}


@pytest.mark.parametrize(
    "failure, detail",
    [
        (ParameterError("repaint_end", "must lie inside the source (1.0 s), got 3.0"),
         "repaint_end: must lie inside the source (1.0 s), got 3.0"),
        (EngineRejected("SRC_AUDIO: longer than 240 s"), "src_audio_path: longer than 240 s"),
    ],
    ids=["parameter-error", "source-tensor-named"],
)
def test_source_length_errors_of_the_engine_answer_400(tmp_path, failure, detail):
    """The checks that need the source's length are the engine's; its refusal is a 400 naming the request's
    field (the source's, where the engine names the tensor that carried it)."""
    with TestClient(create_app(settings_for(tmp_path), ToneEngine(failure))) as client:
        name = post_upload(client, audio_bytes(1.0, 44100, 2)).json()["name"]
        response = client.post("/generate", json=payload(**window(src_audio_path=name, repaint_end=0.9)))
        assert (response.status_code, response.json()) == (400, {"detail": detail})
        assert [n for n in files_in(client.app.state.store.root) if not n.startswith(".")] == []


# ---- good requests: what reaches the engine and what comes back -------------------------------------------


@pytest.mark.parametrize(
    "changes, task, source_field",
    [
        (window(retake_variance=0.7, retake_seeds=[5]), "repaint", "src_audio_path"),
        ({"task": "extend", "src_audio_path": UPLOAD, "repaint_start": -0.5, "repaint_end": 1.5}, "extend",
         "src_audio_path"),
        ({"task": "edit", "src_audio_path": OUTPUT, "edit_target_prompt": "jazz", "edit_target_lyrics": "[verse]\nla",
          "edit_n_min": 0.2, "edit_n_max": 0.8, "edit_n_avg": 2}, "edit", "src_audio_path"),
        (audio2audio(ref_audio_strength=0.8, lora_name_or_path="rap", lora_weight=0.5), "audio2audio",
         "ref_audio_input"),
        ({"task": "retake", "retake_variance": 0.2}, "retake", None),
    ],
    ids=["repaint", "extend", "edit-of-an-output", "audio2audio", "retake"],
)
def test_each_task_reaches_the_engine_with_its_fields_and_source(module_app, changes, task, source_field):
    client, engine, names = module_app
    body = payload(**resolved(changes, names))
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    sent = engine.calls[-1]
    assert sent.task == task
    assert {k: getattr(sent, k) for k in body if k in TASK_FIELDS[task] and k != "task"} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in body.items() if k in TASK_FIELDS[task] and k != "task"}
    source = engine.sources[-1]
    if source_field is None:
        assert source is None
    else:
        root = client.app.state.uploads.root if body[source_field] == names[UPLOAD] else client.app.state.store.root
        expected, rate = soundfile.read(root / body[source_field], dtype="float32", always_2d=True)
        assert source.sample_rate == rate and np.array_equal(source.samples, expected.T)
    sidecar = client.get(f"/download/{Path(response.headers['X-Output-Path']).stem}_input_params.json").json()
    assert {f: sidecar["request"][f] for f in GATEWAY_FIELDS} == {f: body.get(f, GATEWAY_DEFAULTS[f]) for f in GATEWAY_FIELDS}


GATEWAY_DEFAULTS = {"src_audio_path": None, "ref_audio_input": None, "audio2audio_enable": False}


@pytest.mark.parametrize(
    "changes, reported",
    [({"task": "retake"}, True), (window(), True), ({"task": "edit", "src_audio_path": UPLOAD}, True),
     ({}, False), (audio2audio(), False)],
    ids=["retake", "repaint", "edit", "text2music", "audio2audio"],
)
def test_retake_seeds_are_reported_for_the_tasks_that_read_them(module_app, changes, reported):
    client, _, names = module_app
    response = client.post("/generate", json=payload(actual_seeds=[3, 4], **resolved(changes, names)))
    assert response.status_code == 200, response.text
    engine_retake = [ToneEngine.RETAKE_OFFSET + 3, ToneEngine.RETAKE_OFFSET + 4]
    expected = engine_retake if reported else []
    assert response.headers.get("X-Retake-Seeds") == (",".join(map(str, expected)) if reported else None)
    assert response.headers["X-Actual-Seeds"] == "3,4"
    assert client.get(f"/jobs/{response.headers['X-Job-Id']}").json()["retake_seeds"] == expected
    second = response.headers["X-Output-Files"].split(",")[1]
    sidecar = client.get(f"/download/{Path(second).stem}_input_params.json").json()
    assert sidecar["retake_seeds"] == expected and sidecar["retake_seed"] == (expected[1] if reported else None)


# ---- jobs: the source stays a name; a source removed while queued fails the job -----------------------------


class GatedEngine(ToneEngine):
    """ToneEngine whose text2music generations wait for `gate`: keeps one job running, the next queued."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    async def generate(self, params, progress=None, source=None, stream_audio=False, request_id=""):
        if params.task == "text2music":
            await asyncio.to_thread(self.gate.wait, 30)
        return await super().generate(params, progress, source, stream_audio, request_id)


def wait_for_state(client: TestClient, job_id: str, states: set[str]) -> dict:
    deadline = time.monotonic() + 30
    while (job := client.get(f"/jobs/{job_id}").json())["state"] not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def test_queued_job_keeps_the_upload_and_fails_clearly_when_it_went(tmp_path):
    engine = GatedEngine()
    with TestClient(create_app(settings_for(tmp_path, max_running_jobs=1), engine)) as client:
        kept, doomed = (post_upload(client, audio_bytes(1.0, 22050, 1)).json()["name"] for _ in range(2))
        spare = post_upload(client, audio_bytes(1.0, 22050, 1)).json()["name"]
        blocker = client.post("/jobs", json=payload()).json()["id"]
        wait_for_state(client, blocker, {"running"})
        queued = [client.post("/jobs", json=payload(**window(src_audio_path=name))).json()["id"] for name in (kept, doomed)]
        assert [client.get(f"/jobs/{j}").json()["state"] for j in queued] == ["queued", "queued"]
        jobs = client.app.state.jobs
        assert [jobs.get(j).request["src_audio_path"] for j in queued] == [kept, doomed]  # stored by name
        in_use = client.delete(f"/uploads/{doomed}")
        assert in_use.status_code == 409 and in_use.json()["detail"].startswith("name")
        assert client.delete(f"/uploads/{spare}").status_code == 204
        assert {u["name"] for u in client.get("/uploads").json()["uploads"]} == {kept, doomed}
        os.unlink(client.app.state.uploads.root / doomed)  # gone by other means (an operator, another gateway)
        engine.gate.set()
        done = [wait_for_state(client, j, {"succeeded", "failed"}) for j in queued]
        assert done[0]["state"] == "succeeded"
        assert done[1]["state"] == "failed" and done[1]["error"] == f"src_audio_path: {doomed!r} was removed before the job ran"
        assert jobs.get(queued[1]).error_status == 400 and done[1]["files"] == []


def test_triton_inputs_carry_the_task_fields_away_from_default_and_the_source():
    params = GenerationParams(prompt="pop", lyrics="", task="repaint", repaint_start=1.0, repaint_end=2.5,
                              retake_seeds=(7, 8))
    samples = np.random.default_rng(0).uniform(-1, 1, (1, 300)).astype(np.float32)
    arrays = input_arrays(params, SourceAudio(samples, 22050))
    assert set(arrays) - {spec.name for spec in ENSEMBLE_INPUTS} == {
        "TASK", "REPAINT_START", "REPAINT_END", "RETAKE_SEEDS", "SRC_AUDIO", "SRC_SAMPLE_RATE"}
    assert arrays["TASK"].tolist() == [b"repaint"] and arrays["REPAINT_END"].tolist() == [2.5]
    assert arrays["RETAKE_SEEDS"].dtype == np.int64 and arrays["RETAKE_SEEDS"].tolist() == [7, 8]
    assert arrays["SRC_AUDIO"].dtype == np.float32 and np.array_equal(arrays["SRC_AUDIO"], samples)
    assert arrays["SRC_SAMPLE_RATE"].dtype == np.int32 and arrays["SRC_SAMPLE_RATE"].tolist() == [22050]
    # a text2music request is the contract's inputs alone (what a deployment without the tasks takes)
    assert list(input_arrays(GenerationParams(prompt="pop", lyrics=""))) == [spec.name for spec in ENSEMBLE_INPUTS]


# ---- the stream's errors, and the README's task table -------------------------------------------------------


def readme_task_table() -> tuple[dict[str, set[str]], set[str]]:
    """gateway/README.md's task table: the fields each task's column marks, and every field it names.
    A row may name several fields (comma-separated), which share its marks."""
    text = (REPO_ROOT / "gateway" / "README.md").read_text()
    block = text[text.index("<!-- task-table -->"):text.index("<!-- /task-table -->")]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("| ---")]
    tasks = [cell.strip("`") for cell in rows[0][1:]]
    table: dict[str, set[str]] = {task: set() for task in tasks}
    named: set[str] = set()
    for row in rows[1:]:
        fields = {name.strip().strip("`") for name in row[0].split(",")}
        named |= fields
        for task, mark in zip(tasks, row[1:], strict=True):
            assert mark in ("✓", ""), mark
            if mark:
                table[task] |= fields
    return table, named


def test_readme_task_table_matches_the_contract():
    """Every request field but `task`, and the gateway's source fields, with the tasks that read them."""
    table, named = readme_task_table()
    assert set(table) == set(TASKS)
    assert named == {f.name for f in dataclasses.fields(GenerationParams)} - {"task"} | set(GATEWAY_FIELDS)
    for task in TASKS:
        gateway = {SOURCE_FIELDS[task]} if task in SOURCE_FIELDS else set()
        if task == AUDIO2AUDIO:
            gateway.add("audio2audio_enable")
        assert table[task] == (TASK_FIELDS[task] - {"task"}) | gateway, task
