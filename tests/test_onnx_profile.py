"""The `onnx` profile: the exported graphs under ONNX Runtime, end to end through a real tritonserver."""

from __future__ import annotations

import numpy as np
import soundfile

from export.build_repository import build_repository
from export.model_config import read_model_config
from tests.golden_cases import ext_request, golden_params, golden_tensors
from tests.test_triton_repository import infer


def test_onnx_profile_ensemble_matches_golden(tmp_path_factory, triton_server_factory, golden_ckpt, lyric_vocab,
                                              onnx_exports, golden_dir) -> None:
    repo = build_repository("onnx", golden_ckpt, tmp_path_factory.mktemp("onnx_repo"), lyric_vocab,
                            onnx_dir=onnx_exports)
    config = read_model_config(repo / "dit_step" / "config.pbtxt")
    assert config.parameters["ENGINE"].string_value == "onnx"
    assert config.parameters["ONNX_PATH"].string_value == str(onnx_exports / "dit_step.onnx")

    server = triton_server_factory(repo)
    case = "a_euler_apg_erg"
    out = infer(server, golden_params(golden_dir, case))
    ref = golden_tensors(golden_dir, case)["final_waveform"].numpy()
    err = np.abs(out.waveforms[0] - ref).max()
    assert err < 1e-4, f"onnx profile: waveform max abs error {err:.2e}"

    # a task that starts from audio: its source through the dcae_encoder graph
    assert read_model_config(repo / "dcae_encoder" / "config.pbtxt").parameters["ENGINE"].string_value == "onnx"
    case = "a1_audio2audio_s05"
    params, source = ext_request(golden_dir, case)
    out = infer(server, params, source=source)
    ref, _ = soundfile.read(golden_dir / "ext" / f"{case}.wav", dtype="float32", always_2d=True)
    err = np.abs(out.waveforms[0] - ref.T).max()
    assert err < 1e-4, f"onnx profile, {case}: waveform max abs error {err:.2e}"
