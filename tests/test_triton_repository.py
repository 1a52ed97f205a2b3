"""The model repository served by a real tritonserver: the ensemble equals the in-process pipeline."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from acestep_triton.contract import ENSEMBLE_NAME, STAGES, GenerationParams, GenerationResult, SourceAudio
from acestep_triton.ensemble_client import infer_inputs, read_result
from acestep_triton.pipeline import Text2MusicPipeline
from acestep_triton.tritonserver import TritonServer, TritonServerError
from export.build_repository import build_repository
from export.model_config import read_model_config
from tests.golden_cases import GOLDEN_CASES, golden_params, golden_tensors

SHORT = dict(prompt="pop, piano", lyrics="[verse]\nla la la", infer_step=3, actual_seeds=(11,))


def infer(server: TritonServer, params: GenerationParams, protocol: str = "grpc", overrides=None,
          source: SourceAudio | None = None) -> GenerationResult:
    """Call the ensemble with the gateway's client code; `overrides` replaces input arrays (to send
    malformed tensors); `source` is the audio of the tasks that start from one."""
    client_mod = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = client_mod.InferenceServerClient(url)
    inputs = infer_inputs(client_mod, params, overrides, source)
    result = client.infer(ENSEMBLE_NAME, inputs, client_timeout=600) if protocol == "grpc" else \
        client.infer(ENSEMBLE_NAME, inputs, timeout=600)
    return read_result(result)


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint, lyric_vocab) -> Text2MusicPipeline:
    return Text2MusicPipeline.from_checkpoint(tiny_checkpoint, lyric_vocab)


def test_configs_are_generated_and_parse(model_repository: Path) -> None:
    names = sorted(p.name for p in model_repository.iterdir() if (p / "config.pbtxt").is_file())
    assert names == sorted([ENSEMBLE_NAME, "preprocess", "text_encoder", "condition_encoder", "diffusion",
                            "dcae_encoder", "dit_step", "dcae_decoder", "vocoder", "acestep_stream"])
    dit = read_model_config(model_repository / "dit_step" / "config.pbtxt")
    assert dit.max_batch_size > 1 and dit.HasField("dynamic_batching")
    assert {i.name for i in dit.input if i.allow_ragged_batch} == {"LATENTS", "ATTENTION_MASK", "ENCODER_STATES",
                                                                  "ENCODER_MASK"}
    ensemble = read_model_config(model_repository / ENSEMBLE_NAME / "config.pbtxt")
    assert [s.model_name for s in ensemble.ensemble_scheduling.step][0] == "preprocess"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ensemble_equals_in_process_pipeline(acestep_triton_server, pipeline, golden_dir, protocol) -> None:
    params = golden_params(golden_dir, "a_euler_apg_erg")
    out = infer(acestep_triton_server, params, protocol)
    local = pipeline(params)
    assert out.seeds == local.seeds
    assert out.waveforms.shape == local.waveforms.shape
    np.testing.assert_allclose(out.waveforms, local.waveforms, atol=1e-5, rtol=0)
    assert set(out.timings) == set(STAGES) and min(out.timings.values()) > 0


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_cases_through_triton(acestep_triton_server, golden_dir, case) -> None:
    out = infer(acestep_triton_server, golden_params(golden_dir, case))
    ref = golden_tensors(golden_dir, case)["final_waveform"]
    err = np.abs(out.waveforms[0] - ref.numpy()).max()
    assert err < 1e-4, f"{case}: waveform max abs error {err:.2e}"


def _dit_stats(server: TritonServer) -> tuple[int, int]:
    """(requests, executions) of dit_step: fewer executions than requests means requests shared a batch."""
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    stats = client.get_inference_statistics("dit_step")["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])


def test_concurrent_requests_of_different_durations_batch_and_stay_correct(acestep_triton_server) -> None:
    short = GenerationParams(audio_duration=3.0, **SHORT)
    long = GenerationParams(audio_duration=6.0, **{**SHORT, "actual_seeds": (12,)})
    solo = {p.audio_duration: infer(acestep_triton_server, p).waveforms for p in (short, long)}
    before = _dit_stats(acestep_triton_server)
    results: dict[float, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(p: GenerationParams) -> None:
        try:
            results[p.audio_duration] = infer(acestep_triton_server, p).waveforms
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=run, args=(p,)) for p in (short, long, short, long)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors, errors
    for duration, wave in results.items():
        np.testing.assert_allclose(wave, solo[duration], atol=1e-4, rtol=0)
    requests, executions = (a - b for a, b in zip(_dit_stats(acestep_triton_server), before))
    assert executions < requests, f"dit_step did not batch requests: {executions} executions for {requests} requests"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"INFER_STEP": np.array([0], dtype=np.int32)}, "infer_step"),
        ({"SCHEDULER_TYPE": np.array([b"ddim"], dtype=np.object_)}, "scheduler_type"),
        ({"GUIDANCE_SCALE": np.array([np.nan], dtype=np.float32)}, "guidance_scale"),
        ({"GUIDANCE_SCALE": np.array([1.0], dtype=np.float64)}, "GUIDANCE_SCALE"),
        ({"PROMPT": np.array([b"a", b"b"], dtype=np.object_)}, "PROMPT"),
        ({"AUDIO_DURATION": np.array([1e6], dtype=np.float32)}, "audio_duration"),
    ],
)
def test_bad_tensors_get_an_error_naming_the_problem(acestep_triton_server, override, expected) -> None:
    params = GenerationParams(audio_duration=2.0, **SHORT)
    with pytest.raises(InferenceServerException, match=expected):
        infer(acestep_triton_server, params, overrides=override)
    assert infer(acestep_triton_server, params).waveforms.shape[0] == 1


@pytest.mark.slow
def test_bad_checkpoint_path_fails_readiness_naming_it(tmp_path, tiny_checkpoint, lyric_vocab) -> None:
    repo = build_repository("cpu", tiny_checkpoint, tmp_path / "repo", lyric_vocab)
    config = repo / "vocoder" / "config.pbtxt"
    missing = tmp_path / "no-such-checkpoint"
    config.write_text(config.read_text().replace(str(Path(tiny_checkpoint).resolve()), str(missing)))
    for name in [p.name for p in repo.iterdir() if p.name != "vocoder"]:
        __import__("shutil").rmtree(repo / name)
    with pytest.raises(TritonServerError, match=str(missing)):
        with TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout_s=120):
            pass
