"""The `tensorrt` profile's generated configs match the ONNX graphs the engines are built from.

TensorRT cannot be installed on these machines, so no engine is built or served here: the engine
files below are placeholders and the server is not started. What is checked is what breaks first:
tensor names, dtypes and dims of every plan config against its graph, the optimisation profiles
the instances may use, and the ensemble leaving out the timings a plan cannot produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acestep_triton.checkpoint import validate_checkpoint
from acestep_triton.contract import ENSEMBLE_NAME, stage_time_name
from acestep_triton.registry import NEURAL_COMPONENTS, component_spec
from export.build_repository import build_repository
from export.model_config import read_model_config
from export.tensorrt_build import PLAN_COMPONENTS, engine_manifest

PLACEHOLDER = b"placeholder: engines are built inside the NGC image (TensorRT is not installable here)"
# optimisation profiles per engine, as its manifest records them (dit_step: three duration buckets)
MANIFEST_PROFILES = {name: 3 if name == "dit_step" else 1 for name in PLAN_COMPONENTS}


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    engines = tmp_path / "engines"
    engines.mkdir()
    for name in PLAN_COMPONENTS:
        engine = engines / f"{name}.trt10.5.0.bf16.d30-60-120_l4096.plan"
        engine.write_bytes(PLACEHOLDER)
        engine_manifest(engine).write_text(json.dumps({"profiles": [{}] * MANIFEST_PROFILES[name]}))
    return engines


def _tensors(config_tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    from tritonclient.grpc import model_config_pb2

    return [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in config_tensors]


def test_plan_configs_match_the_onnx_graphs(tmp_path, golden_ckpt, lyric_vocab, onnx_exports, engine_dir) -> None:
    repo = build_repository("tensorrt", golden_ckpt, tmp_path / "repo", lyric_vocab, onnx_dir=onnx_exports,
                            engine_dir=engine_dir)
    ckpt = validate_checkpoint(golden_ckpt)
    for name in PLAN_COMPONENTS:
        config = read_model_config(repo / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        # the config is read from the ONNX graph; the spec, an independent source, must agree with it
        spec = component_spec(name, ckpt)
        assert _tensors(config.input) == [(t.name, t.dtype, t.dims) for t in spec.inputs]
        assert _tensors(config.output) == [(t.name, t.dtype, t.dims) for t in spec.outputs]
        assert config.max_batch_size == spec.max_batch_size
        assert list(config.instance_group[0].profile) == [str(i) for i in range(MANIFEST_PROFILES[name])]
        assert (repo / name / "1" / "model.plan").read_bytes() == PLACEHOLDER
    assert read_model_config(repo / "diffusion" / "config.pbtxt").backend == "python"
    for name in set(NEURAL_COMPONENTS) - set(PLAN_COMPONENTS):  # TensorRT cannot build it: PyTorch on the GPU
        config = read_model_config(repo / name / "config.pbtxt")
        assert config.backend == "python" and config.parameters["ENGINE"].string_value == "pytorch"
        assert config.parameters["DEVICE"].string_value == "cuda"

    ensemble = read_model_config(repo / ENSEMBLE_NAME / "config.pbtxt")
    names = {t.name for t in ensemble.output}
    assert {"WAVEFORM", "SEEDS", stage_time_name("preprocess"), stage_time_name("diffusion")} <= names
    assert stage_time_name("dit_step") not in names and stage_time_name("vocoder") not in names


def test_tensorrt_profile_needs_engines(tmp_path, golden_ckpt, lyric_vocab, onnx_exports, engine_dir) -> None:
    with pytest.raises(ValueError, match="needs --engine-dir"):
        build_repository("tensorrt", golden_ckpt, tmp_path / "a", lyric_vocab, onnx_dir=onnx_exports)
    next(engine_dir.glob("vocoder.*.plan")).unlink()
    with pytest.raises(FileNotFoundError, match="vocoder.trt"):
        build_repository("tensorrt", golden_ckpt, tmp_path / "b", lyric_vocab, onnx_dir=onnx_exports,
                         engine_dir=engine_dir)


def test_unknown_profile_is_named(tmp_path, golden_ckpt) -> None:
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        build_repository("tpu", golden_ckpt, tmp_path / "c")
