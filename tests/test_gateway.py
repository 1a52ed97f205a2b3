"""The REST gateway: contract validation, errors, outputs store, and end to end through tritonserver.

Fast tests run the real app (TestClient) with the real Triton engine pointed at
a closed loopback port, or with `ToneEngine`, a small GenerationEngine that
writes sine tones, where a successful answer is needed without a server. The
end-to-end tests at the bottom use the `acestep_triton_server` and
`tiny_checkpoint` fixtures (a real tritonserver serving the tiny checkpoint).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from acestep_triton.contract import (
    ENSEMBLE_INPUTS,
    MAX_LYRICS_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEEDS,
    OUTPUT_SAMPLE_RATE,
    STAGES,
    GenerationParams,
    GenerationResult,
    ParameterError,
    SourceAudio,
)
from acestep_triton.ensemble_client import input_arrays
from acestep_triton.geometry import PUBLISHED_GEOMETRY
from gateway import GenerationEngine, OutputStore, Settings, TritonEngine, create_app
from gateway.engine import Progress, Readiness
from gateway.errors import INTERNAL_ERROR_DETAIL, EngineRejected, EngineUnavailable, OutputNotFound
from gateway.outputs import encode_wav
from gateway.settings import SettingsError
from tests.rest_requests import EXAMPLE_1

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMING_HEADERS = ("X-Generation-Time", "X-Init-Time", "X-Prep-Time", "X-Generation-Time-Detailed")

REQUIRED_FIELDS = tuple(EXAMPLE_1)
SERVED_CHECKPOINT = "/models/ACE-Step-v1-3.5B"


class ToneEngine(GenerationEngine):
    """A GenerationEngine without Triton: one sine per seed (frequency from the seed), for HTTP-level tests.

    `failure` makes generate() raise it; `calls`, `sources` and `request_ids` record the parameters, source
    audio and request ids received. Its retake seeds are RETAKE_OFFSET + seed, so that a test can tell the
    engine's report.
    """

    RETAKE_OFFSET = 1000

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.calls: list[GenerationParams] = []
        self.sources: list[SourceAudio | None] = []
        self.request_ids: list[str] = []

    async def generate(self, params: GenerationParams, progress=None, source: SourceAudio | None = None,
                       stream_audio: bool = False, request_id: str = "") -> GenerationResult:
        """With `stream_audio` the tones also go to `progress` in three chunks, as a streaming vocoder's."""
        self.calls.append(params)
        self.sources.append(source)
        self.request_ids.append(request_id)
        if self.failure is not None:
            raise self.failure
        seeds = params.actual_seeds or (7,)
        duration = params.audio_duration if params.audio_duration > 0 else 1.0
        t = np.arange(int(duration * OUTPUT_SAMPLE_RATE)) / OUTPUT_SAMPLE_RATE
        tones = [np.sin(2 * np.pi * (200 + seed % 400) * t) * 0.1 for seed in seeds]
        waveforms = np.stack([np.stack([tone, -tone]) for tone in tones]).astype(np.float32)
        if stream_audio and progress is not None:
            total = waveforms.shape[-1]
            for first, last in zip((0, total // 3, 2 * total // 3), (total // 3, 2 * total // 3, total)):
                progress(Progress("vocoder", 0, 0, waveforms[..., first:last], first, total))
                await asyncio.sleep(0)
        return GenerationResult(waveforms, tuple(seeds), duration, {s: 0.001 for s in STAGES}, 0.0,
                                tuple(self.RETAKE_OFFSET + seed for seed in seeds))

    async def ready(self) -> Readiness:
        return Readiness(True)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        checkpoint_path=SERVED_CHECKPOINT,
        triton_url=f"127.0.0.1:{closed_port()}",
        outputs_dir=tmp_path / "outputs",
        triton_timeout_s=10.0,
    )
    return Settings(**(values | overrides))


def payload(**changes) -> dict:
    return EXAMPLE_1 | {"checkpoint_path": SERVED_CHECKPOINT, "audio_duration": 1.0} | changes


def numeric_headers(response) -> dict[str, float]:
    values = {name: float(response.headers[name]) for name in TIMING_HEADERS}
    assert all(math.isfinite(v) and v >= 0 for v in values.values()), values
    return values


def server_timing(header: str) -> dict[str, float]:
    metrics = {}
    for item in header.split(","):
        name, dur = item.strip().split(";")
        assert dur.startswith("dur=")
        metrics[name] = float(dur[len("dur=") :])
    return metrics


@pytest.fixture
def offline_client(tmp_path):
    """The real app and Triton engine, Triton unreachable (a closed loopback port)."""
    with TestClient(create_app(settings_for(tmp_path))) as client:
        yield client


@pytest.fixture
def tone_engine():
    return ToneEngine()


@pytest.fixture
def tone_client(tmp_path, tone_engine):
    with TestClient(create_app(settings_for(tmp_path), tone_engine)) as client:
        yield client


# ---- bad input: the table -------------------------------------------------------------------------

MISSING = object()


class JsonLiteral(str):
    """A value written into the JSON text verbatim (1e999 parses to infinity; JSON has no NaN)."""


def raw_json(body: dict) -> str:
    """JSON text without MISSING fields; NaN/inf as Python's json writes them, JsonLiteral values verbatim."""
    members = [
        f"{json.dumps(key)}: {value if isinstance(value, JsonLiteral) else json.dumps(value)}"
        for key, value in body.items()
        if value is not MISSING
    ]
    return "{" + ", ".join(members) + "}"


BAD_INPUTS = [
    *[(f"missing-{name}", {name: MISSING}, name) for name in REQUIRED_FIELDS],
    ("type-infer_step-string", {"infer_step": "60"}, "infer_step"),
    ("type-infer_step-float", {"infer_step": 60.5}, "infer_step"),
    ("type-audio_duration-string", {"audio_duration": "long"}, "audio_duration"),
    ("type-audio_duration-NaN-string", {"audio_duration": "NaN"}, "audio_duration"),
    ("type-prompt-number", {"prompt": 42}, "prompt"),
    ("type-lyrics-null", {"lyrics": None}, "lyrics"),
    ("type-erg-string-false", {"use_erg_tag": "false"}, "use_erg_tag"),
    ("type-erg-int", {"use_erg_lyric": 1}, "use_erg_lyric"),
    ("type-seeds-string", {"actual_seeds": "123"}, "actual_seeds"),
    ("type-seeds-float-item", {"actual_seeds": [1.5]}, "actual_seeds"),
    ("type-oss-string", {"oss_steps": "1,2"}, "oss_steps"),
    ("type-bf16-string", {"bf16": "true"}, "bf16"),
    ("type-device_id-bool", {"device_id": True}, "device_id"),
    ("type-output_path-number", {"output_path": 5}, "output_path"),
    ("type-guidance_scale_text-string", {"guidance_scale_text": "1"}, "guidance_scale_text"),
    ("unknown-field", {"batch_size": 2}, "batch_size"),
    ("inf-audio_duration-1e999", {"audio_duration": JsonLiteral("1e999")}, "audio_duration"),
    ("inf-guidance_scale--1e999", {"guidance_scale": JsonLiteral("-1e999")}, "guidance_scale"),
    ("inf-omega_scale-Infinity", {"omega_scale": math.inf}, "omega_scale"),
    ("nan-omega_scale", {"omega_scale": math.nan}, "omega_scale"),
    ("nan-guidance_interval", {"guidance_interval": math.nan}, "guidance_interval"),
    ("range-audio_duration-zero", {"audio_duration": 0.0}, "audio_duration"),
    ("range-audio_duration-negative", {"audio_duration": -2.0}, "audio_duration"),
    ("range-audio_duration-too-long", {"audio_duration": 241.0}, "audio_duration"),
    ("range-infer_step-zero", {"infer_step": 0}, "infer_step"),
    ("range-infer_step-huge", {"infer_step": 100000}, "infer_step"),
    ("range-guidance_scale-negative", {"guidance_scale": -1.0}, "guidance_scale"),
    ("range-guidance_interval", {"guidance_interval": 1.5}, "guidance_interval"),
    ("range-guidance_interval_decay", {"guidance_interval_decay": -0.1}, "guidance_interval_decay"),
    ("range-min_guidance_scale", {"min_guidance_scale": -3.0}, "min_guidance_scale"),
    ("range-guidance_scale_lyric", {"guidance_scale_lyric": -1.0}, "guidance_scale_lyric"),
    ("range-seed-negative", {"actual_seeds": [-1]}, "actual_seeds"),
    ("range-seed-2**32", {"actual_seeds": [2**32]}, "actual_seeds"),
    ("range-seed-2**70", {"actual_seeds": [2**70]}, "actual_seeds"),
    ("range-too-many-seeds", {"actual_seeds": list(range(MAX_SEEDS + 1))}, "actual_seeds"),
    ("range-oss-zero", {"oss_steps": [0, 10]}, "oss_steps"),
    ("range-oss-duplicate", {"oss_steps": [10, 10]}, "oss_steps"),
    ("choice-scheduler", {"scheduler_type": "ddim"}, "scheduler_type"),
    ("choice-cfg_type", {"cfg_type": "cfg++"}, "cfg_type"),
    ("size-lyrics", {"lyrics": "la " * (MAX_LYRICS_CHARS // 3 + 1)}, "lyrics"),
    ("size-prompt", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ("output_path-parent", {"output_path": "../escape.wav"}, "output_path"),
    ("output_path-absolute", {"output_path": "/tmp/escape.wav"}, "output_path"),
    ("output_path-subdirectory", {"output_path": "sub/x.wav"}, "output_path"),
    ("output_path-backslash", {"output_path": "..\\escape.wav"}, "output_path"),
    ("output_path-encoded", {"output_path": "%2e%2e%2fescape.wav"}, "output_path"),
    ("output_path-hidden", {"output_path": ".hidden.wav"}, "output_path"),
    ("output_path-dotdot", {"output_path": ".."}, "output_path"),
    ("output_path-empty", {"output_path": ""}, "output_path"),
    ("output_path-not-wav", {"output_path": "song.mp3"}, "output_path"),
    ("output_path-nul", {"output_path": "a\u0000.wav"}, "output_path"),
    ("deploy-checkpoint_path", {"checkpoint_path": "/elsewhere/ACE-Step-v1-3.5B"}, "checkpoint_path"),
    ("deploy-bf16", {"bf16": True}, "bf16"),
    ("deploy-torch_compile", {"torch_compile": True}, "torch_compile"),
    ("deploy-device_id", {"device_id": 1}, "device_id"),
]




@pytest.mark.parametrize("changes, field", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_answers_400_naming_the_field(offline_client, changes, field):
    body = raw_json(payload(**changes))
    response = offline_client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["detail"]
    assert response.json()["detail"].startswith(field), response.json()
    # The server keeps serving: the same client gets a well-formed answer right after.
    health = offline_client.get("/health")
    assert health.status_code == 503 and "detail" in health.json()


def test_deploy_mismatch_says_what_is_served(offline_client):
    detail = offline_client.post("/generate", json=payload(checkpoint_path="/other")).json()["detail"]
    assert SERVED_CHECKPOINT in detail
    assert "serves bf16=false, got true" in offline_client.post("/generate", json=payload(bf16=True)).json()["detail"]


def test_served_deploy_fields_are_accepted(tmp_path, tone_engine):
    settings = settings_for(tmp_path, bf16=True, torch_compile=True, device_id=3)
    with TestClient(create_app(settings, tone_engine)) as client:
        served = payload(checkpoint_path=SERVED_CHECKPOINT + "/", bf16=True, torch_compile=True, device_id=3)
        assert client.post("/generate", json=served).status_code == 200
        assert client.post("/generate", json=payload(bf16=False)).json()["detail"].startswith("bf16")


@pytest.mark.parametrize(
    "body",
    ["{", "[]", "", "null", '{"prompt": "x"'],
    ids=["truncated", "array", "empty", "null", "unterminated"],
)
def test_malformed_body_answers_400(offline_client, body):
    response = offline_client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert list(response.json()) == ["detail"] and response.json()["detail"].startswith("body")


def test_unknown_route_and_method_keep_the_error_shape(offline_client):
    assert offline_client.get("/nowhere").json() == {"detail": "Not Found"}
    response = offline_client.get("/generate")
    assert response.status_code == 405 and list(response.json()) == ["detail"]


# ---- Triton unreachable ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_triton_answers_503(tmp_path, protocol):
    with TestClient(create_app(settings_for(tmp_path, triton_protocol=protocol))) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert "unreachable" in health.json()["detail"] and health.json()["status"] == "unhealthy"
        started = time.monotonic()
        response = client.post("/generate", json=payload())
        assert response.status_code == 503, response.text
        assert list(response.json()) == ["detail"] and "Triton" in response.json()["detail"]
        assert time.monotonic() - started < 5.0
        # nothing but the (hidden) job database
        assert not [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]


# ---- success path and error mapping (ToneEngine) --------------------------------------------------------


def test_generate_answers_wav_headers_and_sidecar(tone_client, tone_engine, tmp_path):
    response = tone_client.post("/generate", json=payload(actual_seeds=[11], guidance_scale_text=2.0))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    numeric_headers(response)
    assert set(server_timing(response.headers["Server-Timing"])) >= {"init", "prep", "total", *STAGES}
    audio, rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE and audio.shape == (OUTPUT_SAMPLE_RATE, 2)
    assert soundfile.info(io.BytesIO(response.content)).subtype == "FLOAT"

    path = Path(response.headers["X-Output-Path"])
    assert path.parent == (tmp_path / "outputs").resolve() and path.read_bytes() == response.content
    sidecar = json.loads(path.with_name(path.stem + "_input_params.json").read_text())
    assert sidecar["actual_seeds"] == [11] and sidecar["seed"] == 11
    assert sidecar["request"]["guidance_scale_text"] == 2.0 and sidecar["request"]["bf16"] is False
    assert sidecar["timings"]["total"] == pytest.approx(float(response.headers["X-Generation-Time"]), abs=1e-5)
    # Every run-time field reached the engine; the fields the request left out kept their defaults.
    sent = tone_engine.calls[-1].to_dict()
    asked = {k: v for k, v in payload(actual_seeds=[11], guidance_scale_text=2.0, guidance_scale_lyric=0.0).items()
             if k in sent}
    assert sent == {**GenerationParams(prompt="", lyrics="").to_dict(), **asked}


def test_several_seeds_write_every_item(tone_client):
    response = tone_client.post("/generate", json=payload(actual_seeds=[3, 4, 5], output_path="trio.wav"))
    assert response.status_code == 200
    assert response.headers["X-Actual-Seeds"] == "3,4,5"
    names = response.headers["X-Output-Files"].split(",")
    assert names == ["trio.wav", "trio_1.wav", "trio_2.wav"]
    bodies = [tone_client.get(f"/download/{name}").content for name in names]
    assert bodies[0] == response.content and len({*bodies}) == 3
    sidecar = tone_client.get("/download/trio_2_input_params.json").json()
    assert sidecar["seed"] == 5 and sidecar["item"] == 2 and sidecar["actual_seeds"] == [3, 4, 5]


def test_output_path_is_used_and_replaced(tone_client):
    first = tone_client.post("/generate", json=payload(actual_seeds=[1], output_path="mine.wav"))
    second = tone_client.post("/generate", json=payload(actual_seeds=[2], output_path="mine.wav"))
    assert first.headers["X-Output-Path"] == second.headers["X-Output-Path"]
    assert Path(second.headers["X-Output-Path"]).name == "mine.wav"
    assert tone_client.get("/download/mine.wav").content == second.content != first.content


@pytest.mark.parametrize(
    "failure, status, detail",
    [
        (RuntimeError("secret stack detail"), 500, INTERNAL_ERROR_DETAIL),
        (OSError("disk /secret full"), 500, INTERNAL_ERROR_DETAIL),
        (EngineRejected("audio_duration: too short for the model"), 400, "audio_duration: too short for the model"),
        (EngineUnavailable("Triton at x is unreachable"), 503, "Triton at x is unreachable"),
    ],
    ids=["unexpected", "oserror", "rejected", "unavailable"],
)
def test_engine_errors_map_to_status(tmp_path, failure, status, detail):
    with TestClient(create_app(settings_for(tmp_path), ToneEngine(failure)), raise_server_exceptions=False) as client:
        response = client.post("/generate", json=payload())
        assert (response.status_code, response.json()) == (status, {"detail": detail})
        assert "secret" not in response.text
        assert client.get("/health").json() == {"status": "healthy"}


# ---- download --------------------------------------------------------------------------------------


def test_download_serves_outputs_with_headers(tone_client):
    generated = tone_client.post("/generate", json=payload())
    name = Path(generated.headers["X-Output-Path"]).name
    response = tone_client.get(f"/download/{name}")
    assert response.status_code == 200 and response.content == generated.content
    assert response.headers["content-type"] == "audio/wav"
    assert float(response.headers["X-Download-Time"]) >= 0
    assert response.headers["X-File-Path"] == generated.headers["X-Output-Path"]


@pytest.mark.parametrize(
    "raw_path",
    [
        "/download/..",
        "/download/..%2F..%2Fsecret.txt",
        "/download/%2e%2e%2fsecret.txt",
        "/download/%2E%2E%2F%2E%2E%2Fsecret.txt",
        "/download/%2Fetc%2Fpasswd",
        "/download//etc/passwd",
        "/download/..%5Csecret.txt",
        "/download/outside.wav",
        "/download/.tmp-partial.part",
        "/download/missing.wav",
        "/download/sub",
    ],
)
def test_download_refuses_traversal(tmp_path, raw_path):
    (tmp_path / "secret.txt").write_text("top secret")
    outputs = tmp_path / "outputs"
    with TestClient(create_app(settings_for(tmp_path), ToneEngine())) as client:
        (outputs / "outside.wav").symlink_to(tmp_path / "secret.txt")
        (outputs / ".tmp-partial.part").write_text("half")
        (outputs / "sub").mkdir()
        response = client.get(raw_path)
        assert response.status_code in (400, 404), (raw_path, response.status_code)
        assert list(response.json()) == ["detail"]
        assert "top secret" not in response.text


# ---- API key ----------------------------------------------------------------------------------------


def test_api_key_required_when_configured(tmp_path):
    with TestClient(create_app(settings_for(tmp_path, api_key="s3cret"), ToneEngine())) as client:
        denied = client.post("/generate", json=payload())
        assert denied.status_code == 401 and list(denied.json()) == ["detail"]
        assert client.post("/generate", json=payload(), headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/generate", json=payload(), headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.post("/generate", json=payload(), headers={"X-API-Key": "s3cret"}).status_code == 200
        bearer = client.post("/generate", json=payload(), headers={"Authorization": "Bearer s3cret"})
        assert bearer.status_code == 200
        name = Path(bearer.headers["X-Output-Path"]).name
        assert client.get(f"/download/{name}").status_code == 401
        assert client.get(f"/download/{name}", headers={"X-API-Key": "s3cret"}).content == bearer.content
        assert client.get("/health").json() == {"status": "healthy"}


# ---- OpenAPI -----------------------------------------------------------------------------------------


def test_openapi_describes_the_contract(offline_client):
    schema = offline_client.get("/openapi.json").json()
    generate = schema["paths"]["/generate"]["post"]
    request_ref = generate["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = schema["components"]["schemas"][request_ref.rsplit("/", 1)[1]]
    fields = {*REQUIRED_FIELDS, "bf16", "torch_compile", "device_id", "output_path"}
    fields |= {"guidance_scale_text", "guidance_scale_lyric", "format", "bit_depth", "compression_level", "quality"}
    fields |= {"bitrate_mode", "src_audio_path", "audio2audio_enable", "ref_audio_input"}
    props = request["properties"]
    # the other tasks' fields: optional, with upstream's defaults (its pipeline's __call__ signature)
    upstream_defaults = {
        "task": "text2music", "retake_seeds": [], "retake_variance": 0.5, "repaint_start": 0.0, "repaint_end": 0.0,
        "edit_target_prompt": "", "edit_target_lyrics": "", "edit_n_min": 0.0, "edit_n_max": 1.0, "edit_n_avg": 1,
        "ref_audio_strength": 0.5, "lora_name_or_path": "none", "lora_weight": 1.0, "audio2audio_enable": False,
    }
    assert {name: props[name].get("default") for name in upstream_defaults} == upstream_defaults
    assert set(props) == fields | set(upstream_defaults)
    assert set(request["required"]) == set(REQUIRED_FIELDS)
    assert all(prop.get("description") for prop in props.values())
    assert props["task"]["enum"] == ["text2music", "retake", "repaint", "extend", "edit"]
    for name in ("retake_variance", "edit_n_min", "edit_n_max", "ref_audio_strength", "lora_weight"):
        assert (props[name]["minimum"], props[name]["maximum"]) == (0.0, 1.0), name
    assert (props["repaint_start"]["minimum"], props["repaint_end"]["maximum"]) == (-240.0, 240.0)
    assert props["edit_n_avg"]["minimum"] == 1 and props["retake_seeds"]["items"]["maximum"] == 2**32 - 1
    ok = generate["responses"]["200"]
    assert "audio/wav" in ok["content"]
    assert set(ok["headers"]) >= {"X-Output-Path", *TIMING_HEADERS, "Server-Timing"}
    for status in ("400", "500", "503"):
        assert generate["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    download = schema["paths"]["/download/{filename}"]["get"]["responses"]
    assert set(download["200"]["headers"]) == {"X-Download-Time", "X-File-Path"}
    assert "404" in download
    upload = schema["paths"]["/uploads"]["post"]
    assert upload["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    assert {"201", "400", "413"} <= set(upload["responses"])
    assert "409" in schema["paths"]["/uploads/{name}"]["delete"]["responses"]
    assert "422" not in json.dumps(schema["paths"])


# ---- pieces: settings, tensors, outputs store -----------------------------------------------------------


def test_settings_from_environment():
    env = {
        "ACESTEP_CHECKPOINT_PATH": "/ckpt",
        "ACESTEP_TRITON_PROTOCOL": "http",
        "ACESTEP_PRECISION": "bf16",
        "ACESTEP_PORT": "9000",
        "ACESTEP_API_KEY": "k",
    }
    settings = Settings.from_env(env)
    assert (settings.triton_url, settings.bf16, settings.port, settings.api_key) == ("localhost:8000", True, 9000, "k")
    defaults = Settings.from_env({"ACESTEP_CHECKPOINT_PATH": "/ckpt"})
    assert (defaults.triton_protocol, defaults.triton_url, defaults.host, defaults.port) == (
        "grpc",
        "localhost:8001",
        "0.0.0.0",
        8000,
    )
    for bad, name in (
        ({}, "ACESTEP_CHECKPOINT_PATH"),
        ({"ACESTEP_TRITON_PROTOCOL": "ws"}, "ACESTEP_TRITON_PROTOCOL"),
        ({"ACESTEP_PORT": "eighty"}, "ACESTEP_PORT"),
        ({"ACESTEP_TORCH_COMPILE": "maybe"}, "ACESTEP_TORCH_COMPILE"),
        ({"ACESTEP_PRECISION": "fp16"}, "ACESTEP_PRECISION"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(({"ACESTEP_CHECKPOINT_PATH": "/ckpt"} if name != "ACESTEP_CHECKPOINT_PATH" else {}) | bad)


def test_input_arrays_cover_every_ensemble_input():
    params = GenerationParams(
        prompt="pop",
        lyrics="[verse]\nhé",
        audio_duration=12.5,
        infer_step=27,
        actual_seeds=(1, 2**32 - 1),
        oss_steps=(3, 9),
        use_erg_lyric=False,
        guidance_scale_text=1.25,
    )
    arrays = input_arrays(params)
    assert list(arrays) == [spec.name for spec in ENSEMBLE_INPUTS]
    assert arrays["LYRICS"].tolist() == ["[verse]\nhé".encode()]
    assert arrays["AUDIO_DURATION"].dtype == np.float32 and arrays["AUDIO_DURATION"].tolist() == [12.5]
    assert arrays["INFER_STEP"].dtype == np.int32 and arrays["INFER_STEP"].tolist() == [27]
    assert arrays["ACTUAL_SEEDS"].dtype == np.int64 and arrays["ACTUAL_SEEDS"].tolist() == [1, 2**32 - 1]
    assert arrays["OSS_STEPS"].tolist() == [3, 9] and arrays["USE_ERG_LYRIC"].tolist() == [False]
    assert arrays["GUIDANCE_SCALE_TEXT"].tolist() == [1.25]
    assert input_arrays(GenerationParams(prompt="", lyrics=""))["ACTUAL_SEEDS"].shape == (0,)


def test_encode_wav_is_float32_48k_stereo():
    waveform = np.random.default_rng(0).uniform(-1, 1, (2, 4800)).astype(np.float32)
    data = encode_wav(waveform, OUTPUT_SAMPLE_RATE)
    decoded, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE and np.array_equal(decoded.T, waveform)
    assert soundfile.info(io.BytesIO(data)).subtype == "FLOAT"


def test_store_write_is_atomic(tmp_path, monkeypatch):
    store = OutputStore(tmp_path / "out")
    store.write_bytes("keep.wav", b"original")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("keep.wav", b"replacement that never lands")
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("new.wav", b"never")
    assert sorted(p.name for p in store.root.iterdir()) == ["keep.wav"]
    assert (store.root / "keep.wav").read_bytes() == b"original"


@pytest.mark.parametrize(
    "name", ["../x.wav", "/abs/x.wav", "a/b.wav", "..", ".", "", ".x.wav", "x.wav/", "x\\y.wav", "ü.wav", "x.txt"]
)
def test_store_refuses_unsafe_output_names(tmp_path, name):
    with pytest.raises(ParameterError) as error:
        OutputStore(tmp_path).check_audio_name(name)
    assert error.value.field == "output_path"


def test_store_lookup_confines_to_its_directory(tmp_path):
    store = OutputStore(tmp_path / "out")
    (tmp_path / "secret.txt").write_text("secret")
    store.write_bytes("inside.wav", b"ok")
    (store.root / "alias.wav").symlink_to(store.root / "inside.wav")
    (store.root / "escape.wav").symlink_to(tmp_path / "secret.txt")
    assert store.lookup("inside.wav").read_bytes() == b"ok"
    assert store.lookup("alias.wav") == store.root / "inside.wav"
    with pytest.raises(OutputNotFound):
        store.lookup("escape.wav")
    with pytest.raises(OutputNotFound):
        store.lookup("missing.wav")
    for bad in ("../secret.txt", "..", "/etc/passwd", ".hidden"):
        with pytest.raises(ParameterError):
            store.lookup(bad)


def test_store_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    store = OutputStore(tmp_path / "out")
    target = tmp_path / "victim.txt"
    target.write_text("untouched")
    (store.root / "trap.wav").symlink_to(target)
    store.write_bytes("trap.wav", b"new")
    assert target.read_text() == "untouched"
    assert not (store.root / "trap.wav").is_symlink() and (store.root / "trap.wav").read_bytes() == b"new"


def test_gateway_imports_no_torch():
    code = "import sys, gateway.app, gateway.__main__; sys.exit(any(m.split('.')[0] == 'torch' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "torch was imported"


# ---- end to end through a real tritonserver -------------------------------------------------------------


def e2e_payload(checkpoint: Path, **changes) -> dict:
    """Example 1 on the tiny checkpoint, shortened to keep CPU time low."""
    return EXAMPLE_1 | {"checkpoint_path": str(checkpoint), "audio_duration": 5.0, "infer_step": 4} | changes


@pytest.fixture(scope="module")
def e2e_app(acestep_triton_server, tiny_checkpoint, tmp_path_factory):
    settings = Settings(
        checkpoint_path=str(tiny_checkpoint),
        triton_url=acestep_triton_server.grpc_url,
        triton_protocol="grpc",
        outputs_dir=tmp_path_factory.mktemp("gateway-outputs"),
    )
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def example_1(e2e_app, tiny_checkpoint):
    response = e2e_app.post("/generate", json=e2e_payload(tiny_checkpoint))
    assert response.status_code == 200, response.text
    return response


def test_e2e_health(e2e_app):
    assert e2e_app.get("/health").json() == {"status": "healthy"}


def test_e2e_example_1_gives_wav_headers_sidecar_and_download(e2e_app, example_1):
    audio, rate = soundfile.read(io.BytesIO(example_1.content), dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE and audio.ndim == 2 and audio.shape[1] == 2
    assert abs(audio.shape[0] / rate - 5.0) <= PUBLISHED_GEOMETRY.frame_seconds
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert soundfile.info(io.BytesIO(example_1.content)).subtype == "FLOAT"

    timings = numeric_headers(example_1)
    assert timings["X-Generation-Time"] >= timings["X-Generation-Time-Detailed"]
    assert set(server_timing(example_1.headers["Server-Timing"])) >= {"init", "prep", "total", *STAGES}
    assert example_1.headers["X-Actual-Seeds"] == "1234567890"

    path = Path(example_1.headers["X-Output-Path"])
    assert path.read_bytes() == example_1.content
    sidecar = json.loads(path.with_name(path.stem + "_input_params.json").read_text())
    assert sidecar["actual_seeds"] == [1234567890] and sidecar["request"]["prompt"] == EXAMPLE_1["prompt"]
    assert set(sidecar["timings"]["stages"]) == set(STAGES)

    download = e2e_app.get(f"/download/{path.name}")
    assert download.status_code == 200 and download.content == example_1.content
    assert download.headers["X-File-Path"] == str(path) and float(download.headers["X-Download-Time"]) >= 0


def test_e2e_same_seed_same_audio(e2e_app, example_1, tiny_checkpoint):
    again = e2e_app.post("/generate", json=e2e_payload(tiny_checkpoint))
    assert again.status_code == 200
    first = soundfile.read(io.BytesIO(example_1.content), dtype="float32")[0]
    assert np.array_equal(soundfile.read(io.BytesIO(again.content), dtype="float32")[0], first)


def test_e2e_http_protocol_gives_the_same_audio(acestep_triton_server, tiny_checkpoint, example_1, tmp_path):
    settings = Settings(
        checkpoint_path=str(tiny_checkpoint),
        triton_url=acestep_triton_server.http_url,
        triton_protocol="http",
        outputs_dir=tmp_path,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/generate", json=e2e_payload(tiny_checkpoint))
    assert response.status_code == 200, response.text
    first = soundfile.read(io.BytesIO(example_1.content), dtype="float32")[0]
    assert np.array_equal(soundfile.read(io.BytesIO(response.content), dtype="float32")[0], first)


def test_e2e_parameter_error_inside_triton_over_http_keeps_its_detail(acestep_triton_server):
    """What only Triton can refuse comes back as its ParameterError text, "<field>: why", which the gateway
    answers with 400: over HTTP without Triton's "in ensemble 'acestep', " prefix (the gRPC stream's
    errors: tests/test_jobs.py). Sent here: a request past the gateway's own checks (infer_step 0
    forced into validated parameters)."""
    params = GenerationParams(prompt="pop", lyrics="", audio_duration=2.0, infer_step=2)
    object.__setattr__(params, "infer_step", 0)
    engine = TritonEngine(acestep_triton_server.http_url, "http", timeout_s=120)

    async def generate():
        try:
            return await engine.generate(params)
        finally:
            await engine.aclose()

    with pytest.raises(EngineRejected) as rejected:
        asyncio.run(generate())
    assert str(rejected.value).startswith("infer_step: must be in [1, "), str(rejected.value)


def test_job_settings_from_environment():
    env = {"ACESTEP_CHECKPOINT_PATH": "/ckpt", "ACESTEP_MAX_PENDING_JOBS": "5", "ACESTEP_MAX_RUNNING_JOBS": "2",
           "ACESTEP_JOB_DEADLINE_S": "30", "ACESTEP_RETENTION_S": "3600", "ACESTEP_RETENTION_INTERVAL_S": "60"}
    settings = Settings.from_env(env)
    assert (settings.max_pending_jobs, settings.max_running_jobs, settings.job_deadline_s) == (5, 2, 30.0)
    assert (settings.retention_s, settings.retention_interval_s) == (3600.0, 60.0)
    for bad, match in (
        ({"ACESTEP_MAX_PENDING_JOBS": "0"}, "max_pending_jobs"),
        ({"ACESTEP_MAX_PENDING_JOBS": "1", "ACESTEP_MAX_RUNNING_JOBS": "2"}, "max_running_jobs"),
        ({"ACESTEP_JOB_DEADLINE_S": "soon"}, "ACESTEP_JOB_DEADLINE_S"),
    ):
        with pytest.raises(SettingsError, match=match):
            Settings.from_env(env | bad)


# ---- audio streams of jobs ---------------------------------------------------------------------------

@pytest.mark.parametrize("bit_depth", [16, 32])
def test_job_audio_stream_is_the_jobs_file(tone_client, bit_depth):
    """GET /jobs/{id}/audio sends the header of the whole file, then each chunk the engine reports as it
    comes, then the rest from the written file: the bytes are the file's, for every item."""
    job = tone_client.post("/jobs", json=payload(actual_seeds=[3, 4], bit_depth=bit_depth)).json()
    for item in (0, 1):
        with tone_client.stream("GET", f"/jobs/{job['id']}/audio", params={"item": item}) as streamed:
            assert streamed.status_code == 200 and streamed.headers["content-type"] == "audio/wav"
            body = b"".join(streamed.iter_bytes())
        finished = tone_client.get(f"/jobs/{job['id']}").json()
        assert finished["state"] == "succeeded"
        assert body == tone_client.get(f"/download/{finished['files'][item]}").content


def test_job_audio_stream_refuses_other_formats_and_items(tone_client):
    flac = tone_client.post("/jobs", json=payload(format="flac")).json()
    answer = tone_client.get(f"/jobs/{flac['id']}/audio")
    assert answer.status_code == 409 and "flac" in answer.json()["detail"]
    wav = tone_client.post("/jobs", json=payload(actual_seeds=[1])).json()
    answer = tone_client.get(f"/jobs/{wav['id']}/audio", params={"item": 1})
    assert answer.status_code == 400 and answer.json()["detail"].startswith("item")
    assert tone_client.get("/jobs/nope/audio").status_code == 404


def test_generate_does_not_ask_the_engine_to_stream(tmp_path):
    """/generate answers with the whole file, so its generation is not split into chunks."""
    asked = []

    class Recording(ToneEngine):
        async def generate(self, params, progress=None, source=None, stream_audio=False, request_id=""):
            asked.append(stream_audio)
            return await super().generate(params, progress, source, stream_audio, request_id)

    with TestClient(create_app(settings_for(tmp_path), Recording())) as client:
        assert client.post("/generate", json=payload()).status_code == 200
        job = client.post("/jobs", json=payload()).json()
        assert client.get(f"/jobs/{job['id']}/audio").status_code == 200
    assert asked == [False, True]


def test_float_wav_header_does_not_depend_on_the_samples():
    """No PEAK chunk (peaks and a timestamp): a float WAV's header is known before its samples."""
    from gateway.formats import choose_encoding

    encoding = choose_encoding("wav")
    loud = np.full((2, 480), 0.9, dtype=np.float32)
    first, second = encoding.encode(loud, OUTPUT_SAMPLE_RATE), encoding.encode(loud * 0.1, OUTPUT_SAMPLE_RATE)
    header = encoding.wav_header(480, 2, OUTPUT_SAMPLE_RATE)
    assert first.startswith(header) and second.startswith(header) and b"PEAK" not in first
    assert header + encoding.wav_samples(loud[:, :100], OUTPUT_SAMPLE_RATE) + \
        encoding.wav_samples(loud[:, 100:], OUTPUT_SAMPLE_RATE) == first
