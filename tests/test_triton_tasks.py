"""Every task through the real tritonserver (the session's tiny server): the ensemble's optional task
inputs, preprocess's rows and seeds, the loop's BLS call to `dcae_encoder`, the stream model.

Each golden case once (against the official run's waveform; the repaint case through the stream
model, with its step count), one request off the golden paths (against the in-process pipeline),
and the bad inputs a direct client can send, each answered with an error naming the field while
the server goes on.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from acestep_triton.contract import (
    AUDIO2AUDIO,
    ENSEMBLE_NAME,
    EXTEND,
    REPAINT,
    TASK_INPUTS,
    TEXT2MUSIC,
    GenerationParams,
    SourceAudio,
)
from acestep_triton.ensemble_client import infer_inputs, input_arrays
from acestep_triton.pipeline import Text2MusicPipeline
from tests.golden_cases import EXT_CASES, ext_request
from tests.stream_client import stream_responses
from tests.test_triton_repository import infer

CHAIN_TOL = 1e-4


STREAMED_CASE = "p1_repaint"  # through acestep_stream below; the others through the ensemble


@pytest.mark.parametrize("case", [c for c in EXT_CASES if c != STREAMED_CASE])
def test_golden_task_through_the_ensemble(acestep_triton_server, golden_dir, case) -> None:
    params, source = ext_request(golden_dir, case)
    out = infer(acestep_triton_server, params, source=source)
    wav, _ = soundfile.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    assert out.waveforms.shape == (1, *wav.T.shape)
    err = float(np.abs(out.waveforms[0] - wav.T).max())
    assert err < CHAIN_TOL, f"{case}: waveform max abs error {err:.2e}"
    assert out.seeds == params.actual_seeds
    assert out.retake_seeds == params.retake_seeds or (not params.retake_seeds and len(out.retake_seeds) == 1)


def _chirp(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (220 + 200 * t) * t)).astype(np.float32)[None]


def test_a_request_off_the_golden_paths_equals_the_in_process_pipeline(acestep_triton_server, tiny_checkpoint,
                                                                      lyric_vocab) -> None:
    """Extend on both sides, two seeds each with its retake seed, a mono 22.05 kHz source, over HTTP.

    retake_variance 0.9 travels as float32 (0.89999998): n_min = int(10 * (1 - 0.9)) is 0 in double
    precision, as in process and upstream, but 1 from the float32; the server reads the decimal back.
    """
    params = GenerationParams(prompt="pop, piano", lyrics="[verse]\nla la", infer_step=10, task=EXTEND,
                              repaint_start=-0.3, repaint_end=1.25, retake_variance=0.9, actual_seeds=(5, 6),
                              retake_seeds=(50, 60))
    source = SourceAudio(_chirp(1.0, 22050), 22050)
    out = infer(acestep_triton_server, params, "http", source=source)
    local = Text2MusicPipeline.from_checkpoint(tiny_checkpoint, lyric_vocab)(params, source=source)
    assert out.seeds == local.seeds == (5, 6) and out.retake_seeds == local.retake_seeds == (50, 60)
    assert out.waveforms.shape == local.waveforms.shape and out.duration == pytest.approx(local.duration, abs=1e-5)
    np.testing.assert_allclose(out.waveforms, local.waveforms, atol=1e-5, rtol=0)


def test_the_stream_model_runs_a_task_and_counts_its_own_steps(acestep_triton_server, golden_dir) -> None:
    """Repaint from n_min = 2 of 8: six steps reported, the golden waveform at the end."""
    params, source = ext_request(golden_dir, STREAMED_CASE)
    *reports, result = stream_responses(acestep_triton_server.grpc_url,
                                        infer_inputs(grpcclient, params, source=source), timeout_s=600)
    assert not isinstance(result, Exception), result
    steps = [(int(r.as_numpy("STEP")[0]), int(r.as_numpy("STEPS")[0])) for r in reports
             if r.as_numpy("STAGE")[0] == b"diffusion"]
    assert steps == [(i, 6) for i in range(7)]
    wav, _ = soundfile.read(golden_dir / "ext" / f"{STREAMED_CASE}.wav", dtype="float32", always_2d=True)
    assert float(np.abs(result.as_numpy("WAVEFORM")[0] - wav.T).max()) < CHAIN_TOL
    assert result.as_numpy("RETAKE_SEEDS_USED").tolist() == [777]


SHORT = dict(prompt="pop", lyrics="", infer_step=2, actual_seeds=(1,))
# the server stays up after each: the errors come from preprocess and the loop, never a crash
ONE_SECOND = SourceAudio(_chirp(1.0, 44100), 44100)


@pytest.mark.parametrize(("params", "source", "overrides", "expected"), [
    (GenerationParams(**SHORT, task=REPAINT, repaint_start=0.5, repaint_end=2.0), ONE_SECOND, None, "repaint_end"),
    (GenerationParams(**SHORT, task=REPAINT, repaint_end=0.5), None, None, "src_audio_path: task 'repaint' needs"),
    (GenerationParams(**SHORT, task=TEXT2MUSIC, audio_duration=1.0), ONE_SECOND, None, "src_audio_path"),
    (GenerationParams(**SHORT, task=REPAINT, repaint_end=0.5), None,
     {"SRC_AUDIO": ONE_SECOND.samples}, "SRC_AUDIO and SRC_SAMPLE_RATE"),
    (GenerationParams(**SHORT, task="edit", edit_n_max=0.4), ONE_SECOND,
     {"EDIT_N_MIN": np.array([0.6], dtype=np.float32)}, "edit_n_min"),
])
def test_bad_task_requests_name_the_field(acestep_triton_server, params, source, overrides, expected) -> None:
    with pytest.raises(InferenceServerException, match=expected):
        infer(acestep_triton_server, params, overrides=overrides, source=source)
    client = grpcclient.InferenceServerClient(acestep_triton_server.grpc_url)
    assert client.is_server_live() and client.is_model_ready(ENSEMBLE_NAME)


def test_input_arrays_send_only_the_task_fields_away_from_their_defaults() -> None:
    text2music = input_arrays(GenerationParams(**SHORT))
    assert not set(text2music) & {t.name for t in TASK_INPUTS}  # the contract's plain request
    params = GenerationParams(**SHORT, task=REPAINT, repaint_start=0.25, repaint_end=0.75, retake_seeds=(9, 10))
    arrays = input_arrays(params, ONE_SECOND)
    assert set(arrays) - set(text2music) == {"TASK", "REPAINT_START", "REPAINT_END", "RETAKE_SEEDS", "SRC_AUDIO",
                                             "SRC_SAMPLE_RATE"}
    assert arrays["TASK"].tolist() == [b"repaint"] and arrays["RETAKE_SEEDS"].tolist() == [9, 10]
    assert arrays["REPAINT_END"].dtype == np.float32 and arrays["SRC_SAMPLE_RATE"].tolist() == [44100]
    assert arrays["SRC_AUDIO"].dtype == np.float32 and arrays["SRC_AUDIO"].shape == ONE_SECOND.samples.shape


@pytest.fixture(scope="module")
def rest_gateway(acestep_triton_server, tiny_checkpoint, tmp_path_factory):
    from fastapi.testclient import TestClient

    from gateway import Settings, create_app

    settings = Settings(checkpoint_path=str(tiny_checkpoint), triton_url=acestep_triton_server.grpc_url,
                        outputs_dir=tmp_path_factory.mktemp("task-outputs"))
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("case", EXT_CASES)
def test_golden_task_through_the_gateway(rest_gateway, golden_dir, tiny_checkpoint, case) -> None:
    """Each task as a REST client sends it: the source uploaded (POST /uploads), the request by upstream's
    field names (audio2audio through audio2audio_enable + ref_audio_input), the WAV answered equal to the
    official run's within the chain tolerance, and the retake seeds reported."""
    from tests.rest_requests import short_request

    params, source = ext_request(golden_dir, case)
    body = short_request(tiny_checkpoint) | {k: v for k, v in params.to_dict().items()
                                             if k not in ("lora_name_or_path", "lora_weight")}
    if source is not None:
        audio = golden_dir / "ext" / "src_chords_48k_stereo.wav"
        with audio.open("rb") as file:
            uploaded = rest_gateway.post("/uploads", files={"file": (audio.name, file, "audio/wav")})
        assert uploaded.status_code == 201, uploaded.text
        if params.task == AUDIO2AUDIO:
            body |= {"task": TEXT2MUSIC, "audio2audio_enable": True, "ref_audio_input": uploaded.json()["name"]}
        else:
            body["src_audio_path"] = uploaded.json()["name"]
    answer = rest_gateway.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    got, rate = soundfile.read(io.BytesIO(answer.content), dtype="float32", always_2d=True)
    wav, _ = soundfile.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    assert rate == 48000 and got.shape == wav.shape
    err = float(np.abs(got - wav).max())
    assert err < CHAIN_TOL, f"{case}: waveform max abs error {err:.2e}"
    if params.retake_seeds and params.task != AUDIO2AUDIO:
        assert answer.headers["X-Retake-Seeds"] == ",".join(str(s) for s in params.retake_seeds)
