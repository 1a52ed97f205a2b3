"""The committed model_repository/ is the generator's output, and names its checkpoint through the deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from acestep_triton.checkpoint import CHECKPOINT_ENV, DEPLOYMENT_CHECKPOINT, CheckpointError, deployment_checkpoint
from acestep_triton.registry import NEURAL_COMPONENTS
from export.build_repository import MODEL_SOURCES, build_repository
from export.model_config import read_model_config


def _files(repo: Path) -> dict[str, str]:
    """Every file but git's `.gitkeep` (it keeps the ensemble's empty version directory) and bytecode."""
    return {str(p.relative_to(repo)): p.read_text() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.name != ".gitkeep" and "__pycache__" not in p.parts}


def test_committed_repository_is_the_generators_output(tmp_path: Path) -> None:
    """Regenerate with `python -m export.build_repository --profile cpu --out model_repository` when this fails."""
    generated_repo = build_repository("cpu", None, tmp_path / "repo")
    generated, committed = _files(generated_repo), _files(MODEL_SOURCES)
    assert sorted(committed) == sorted(generated)
    for name, text in generated.items():
        assert committed[name] == text, f"model_repository/{name} differs from the generator's output"
    versions = sorted(str(p.relative_to(generated_repo)) for p in generated_repo.glob("*/1"))
    assert versions == sorted(str(p.relative_to(MODEL_SOURCES)) for p in MODEL_SOURCES.glob("*/1"))


def test_committed_models_take_the_checkpoint_from_the_deployment() -> None:
    for name in ("preprocess", *NEURAL_COMPONENTS):
        config = read_model_config(MODEL_SOURCES / name / "config.pbtxt")
        assert config.parameters["CHECKPOINT"].string_value == DEPLOYMENT_CHECKPOINT, name


def test_deployment_checkpoint_reads_the_variable(golden_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_ENV} is not set"):
        deployment_checkpoint(DEPLOYMENT_CHECKPOINT)
    monkeypatch.setenv(CHECKPOINT_ENV, str(golden_ckpt))
    assert deployment_checkpoint(DEPLOYMENT_CHECKPOINT).root == golden_ckpt.resolve()
    assert deployment_checkpoint(str(golden_ckpt)).root == golden_ckpt.resolve()


def test_only_pytorch_profiles_leave_the_checkpoint_to_the_deployment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give --checkpoint"):
        build_repository("onnx", None, tmp_path / "repo")
