"""The export chain on the golden tiny checkpoint: ONNX graphs vs PyTorch, graph I/O vs spec, caching,
engine profiles and the errors a user meets. CPU only; the six exports run once per session
(`onnx_exports` fixture: about 2.5 CPU-minutes, most of this file's time), the rest reuses them."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from acestep_triton.checkpoint import Checkpoint, CheckpointError, validate_checkpoint
from acestep_triton.components import load_component
from acestep_triton.engines import TorchEngine
from acestep_triton.onnx_engine import OnnxEngine
from acestep_triton.sampling.seeds import latent_frames
from acestep_triton.registry import component_spec
from acestep_triton.text_tokenizer import TEXT_MAX_TOKENS
from acestep_triton.versions import VERSIONS_FILE, read_versions
from export import onnx_export
from export.graph_io import io_mismatches, triton_io
from export.onnx_export import COMPONENTS, export_component, manifest_path, onnx_path
from export.parity import PARITY_RTOL, compare_outputs
from export.samples import EXPORT_SIZES, PARITY_SIZES, Sizes, input_shapes, sample_inputs
from export.tensorrt_build import EngineShapes, TensorRTError, build_engine, optimisation_profiles

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE_CONFIGS = REPO_ROOT / "benchmarks" / "full_size_configs"
# Lengths neither the export sample nor the export's own parity check used, one of them all ones:
# batch 1 and one lyric token (empty lyrics) are what a single request sends.
OTHER_SIZES = (Sizes(batch=1, text_tokens=3, lyric_tokens=1, latent_frames=4),
               Sizes(batch=5, text_tokens=12, lyric_tokens=17, latent_frames=21))


@pytest.fixture(scope="module")
def ckpt(golden_ckpt: Path) -> Checkpoint:
    return validate_checkpoint(golden_ckpt)


@pytest.mark.parametrize("name", COMPONENTS)
def test_export_checked_itself_on_other_shapes(onnx_exports: Path, ckpt: Checkpoint, name: str) -> None:
    """Every export ran ONNX Runtime against PyTorch, on inputs shaped unlike the export sample."""
    report = json.loads(manifest_path(onnx_exports, name).read_text())["report"]
    print(f"{name}: export parity {report['parity']} at {report['parity_shapes']}")
    assert set(report["parity"]) == {t.name for t in component_spec(name, ckpt).outputs}
    # the check ran at PARITY_SIZES (its bound is export_onnx's own; the next test measures it again)
    assert report["parity_shapes"] == {k: list(v) for k, v in input_shapes(name, ckpt, PARITY_SIZES).items()}
    exported = {k: list(v.shape) for k, v in sample_inputs(name, ckpt, EXPORT_SIZES).items()}
    assert all(report["parity_shapes"][k] != shape for k, shape in exported.items())


@pytest.mark.parametrize("name", COMPONENTS)
def test_onnx_runtime_matches_pytorch_at_other_shapes(onnx_exports: Path, ckpt: Checkpoint, name: str) -> None:
    """The graph's batch and variable axes are really dynamic: two more shapes, same results as PyTorch."""
    spec = component_spec(name, ckpt)
    torch_engine = TorchEngine(spec, load_component(name, ckpt), torch.device("cpu"), torch.float32)
    onnx_engine = OnnxEngine.load(onnx_path(onnx_exports, name), spec)
    for seed, sizes in enumerate(OTHER_SIZES, start=10):
        inputs = sample_inputs(name, ckpt, sizes, seed=seed)
        parity = compare_outputs(spec, torch_engine.run(inputs), onnx_engine.run(inputs), inputs)
        print(f"{name}: {parity.describe()}")
        assert parity.max_error <= PARITY_RTOL, parity.describe()


@pytest.mark.parametrize("name", COMPONENTS)
def test_spec_matches_graph_io(onnx_exports: Path, ckpt: Checkpoint, name: str) -> None:
    """Names, dtypes, ranks and which axes vary: what a tensorrt_plan / onnxruntime config declares."""
    spec = component_spec(name, ckpt)
    path = onnx_path(onnx_exports, name)
    assert io_mismatches(spec, path) == []
    assert triton_io(path) == (spec.inputs, spec.outputs)


def test_io_mismatches_name_what_differs(onnx_exports: Path, ckpt: Checkpoint) -> None:
    spec = component_spec("dit_step", ckpt)
    path = onnx_path(onnx_exports, "dit_step")
    latents, *rest = spec.inputs
    fixed_frames = dataclasses.replace(latents, dims=latents.dims[:-1] + (13,))
    problems = io_mismatches(dataclasses.replace(spec, inputs=(fixed_frames, *rest)), path)
    assert len(problems) == 1 and "LATENTS" in problems[0] and "13" in problems[0]
    renamed = dataclasses.replace(spec, outputs=(dataclasses.replace(spec.outputs[0], name="NOISE"),))
    assert any("NOISE" in p for p in io_mismatches(renamed, path))
    timestep = dataclasses.replace(spec.inputs[4], dtype="TYPE_INT64")
    int_timestep = dataclasses.replace(spec, inputs=(*spec.inputs[:4], timestep, spec.inputs[5]))
    assert any("TIMESTEP is TYPE_FP32" in p for p in io_mismatches(int_timestep, path))


def test_second_export_is_cached(onnx_exports: Path, ckpt: Checkpoint, capsys) -> None:
    path = onnx_path(onnx_exports, "vocoder")
    before = path.stat().st_mtime_ns
    assert export_component("vocoder", ckpt, onnx_exports) == path
    assert "vocoder: cached at" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == before


def test_stale_export_is_rebuilt(onnx_exports: Path, ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    """A manifest recorded for another opset no longer matches: the graph is rebuilt, and says why."""
    for file in (onnx_path(onnx_exports, "dcae_decoder"), manifest_path(onnx_exports, "dcae_decoder")):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    manifest = manifest_path(tmp_path, "dcae_decoder")
    recorded = json.loads(manifest.read_text())
    recorded["fingerprint"]["opset"] = 17
    manifest.write_text(json.dumps(recorded))
    export_component("dcae_decoder", ckpt, tmp_path)
    out = capsys.readouterr().out
    assert "dcae_decoder: rebuilding (changed: opset)" in out and "relative error MEL" in out
    assert json.loads(manifest.read_text())["fingerprint"]["opset"] == recorded["fingerprint"]["opset"] + 1
    assert not (tmp_path / ".dcae_decoder.partial").exists()


def test_large_weights_go_to_external_data(onnx_exports: Path, ckpt: Checkpoint, tmp_path: Path,
                                           monkeypatch) -> None:
    """Past the size limit the weights go to `<name>.onnx.data` beside the graph, which still loads and runs."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    path = export_component("dcae_decoder", ckpt, tmp_path)
    data = path.with_name(path.name + ".data")
    inline_bytes = onnx_path(onnx_exports, "dcae_decoder").stat().st_size
    assert data.is_file() and path.stat().st_size < inline_bytes < path.stat().st_size + data.stat().st_size
    assert json.loads(manifest_path(tmp_path, "dcae_decoder").read_text())["report"]["external_data"] is True
    spec = component_spec("dcae_decoder", ckpt)
    inputs = sample_inputs("dcae_decoder", ckpt, OTHER_SIZES[0], seed=3)
    inline = OnnxEngine.load(onnx_path(onnx_exports, "dcae_decoder"), spec).run(inputs)
    assert torch.equal(OnnxEngine.load(path, spec).run(inputs)["MEL"], inline["MEL"])


def test_unknown_component_is_refused(golden_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown component 'vae'.*dcae_decoder"):
        export_component("vae", golden_ckpt, tmp_path)


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_component("vocoder", tmp_path / "no-such-checkpoint", tmp_path)


def test_cli_reports_bad_input(golden_ckpt: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        onnx_export.main(["--checkpoint", str(golden_ckpt), "--out", str(tmp_path), "--components", "vae"])
    assert exit_info.value.code == 2 and "invalid choice: 'vae'" in capsys.readouterr().err
    assert onnx_export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    assert "error: checkpoint directory" in capsys.readouterr().err


def test_tensorrt_missing_says_where_to_build(golden_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as where it is not installed
    with pytest.raises(TensorRTError, match="not importable.*docker/README.md"):
        build_engine("vocoder", golden_ckpt, tmp_path / "onnx", tmp_path / "engines")
    assert not (tmp_path / "onnx").exists()


def test_tensorrt_of_another_version_is_refused(golden_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))
    sys.modules["tensorrt"].__version__ = "8.6.1"
    with pytest.raises(TensorRTError, match="8.6.1 is installed but versions.env pins"):
        build_engine("vocoder", golden_ckpt, tmp_path / "onnx", tmp_path / "engines")


def test_unknown_precision_is_refused(golden_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        build_engine("vocoder", golden_ckpt, tmp_path, tmp_path, precision="int4")


def test_onnx_engine_refuses_a_graph_of_another_spec(onnx_exports: Path, ckpt: Checkpoint) -> None:
    with pytest.raises(ValueError, match="re-export"):
        OnnxEngine.load(onnx_path(onnx_exports, "dcae_decoder"), component_spec("vocoder", ckpt))
    with pytest.raises(FileNotFoundError, match="python -m export.onnx_export"):
        OnnxEngine.load(onnx_exports / "missing.onnx", component_spec("vocoder", ckpt))


@pytest.mark.parametrize("config_dir", [None, FULL_SIZE_CONFIGS], ids=["tiny", "full-size"])
def test_engine_profiles_cover_every_duration_and_batch(ckpt: Checkpoint, config_dir: Path | None) -> None:
    """Duration buckets tile 1 .. 240 s of latent frames; batch and token axes span the spec's ranges."""
    source = ckpt if config_dir is None else Checkpoint(config_dir)  # configs are all the shapes need
    dit = component_spec("dit_step", source)
    profiles = optimisation_profiles("dit_step", source, EngineShapes())
    frames = [(p["LATENTS"][0][-1], p["LATENTS"][2][-1]) for p in profiles]
    assert frames == [(1, latent_frames(30)), (latent_frames(30) + 1, latent_frames(60)),
                      (latent_frames(60) + 1, latent_frames(120)), (latent_frames(120) + 1, latent_frames(240))]
    for optimisation in profiles:
        assert optimisation["LATENTS"][2][0] == dit.max_batch_size and optimisation["LATENTS"][0][0] == 1
        assert optimisation["ENCODER_STATES"][2][1:] == (1 + TEXT_MAX_TOKENS + EngineShapes().max_lyric_tokens,
                                                    dit.input("ENCODER_STATES").dims[-1])
    text = optimisation_profiles("text_encoder", source, EngineShapes(max_batch=4))
    assert len(text) == 1 and text[0]["TEXT_IDS"] == ((1, 1), (2, 64), (4, TEXT_MAX_TOKENS))
    vocoder = optimisation_profiles("vocoder", source, EngineShapes(durations_s=(240.0,)))
    assert vocoder[0]["MEL"][2][-1] == 8 * latent_frames(240)


def test_engine_profile_rejects_bad_buckets() -> None:
    with pytest.raises(ValueError, match="durations_s"):
        EngineShapes(durations_s=(60.0, 30.0))
    with pytest.raises(ValueError, match="durations_s"):
        EngineShapes(durations_s=(30.0, 300.0))


def test_versions_are_read_from_one_file_by_docker() -> None:
    """docker/ names no version itself: the image tag and TensorRT pin come from versions.env."""
    versions = read_versions(VERSIONS_FILE)
    assert versions["TRITON_IMAGE"].endswith(":24.10-py3") and int(versions["ONNX_OPSET"]) >= 18
    for name in ("Dockerfile", "compose.yaml"):
        text = (REPO_ROOT / "docker" / name).read_text()
        for value in (versions["TRITON_IMAGE"], versions["TENSORRT_VERSION"], "24.10"):
            assert value not in text, f"docker/{name} repeats {value}; read it from versions.env"
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_IMAGE\s*$", dockerfile, re.M) and "FROM ${TRITON_IMAGE}" in dockerfile
    assert "${TRITON_IMAGE" in (REPO_ROOT / "docker" / "compose.yaml").read_text()
