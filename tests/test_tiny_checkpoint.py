"""The embedded default: a tiny random checkpoint in the published layout that the whole stack runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from acestep_triton.checkpoint import LYRIC_VOCAB_FILENAME, validate_checkpoint
from acestep_triton.contract import GenerationParams
from acestep_triton.pipeline import Text2MusicPipeline
from acestep_triton.tiny import build_tiny_checkpoint

pytestmark = pytest.mark.slow  # builds a checkpoint and generates with it


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_is_the_published_one(built: Path) -> None:
    ckpt = validate_checkpoint(built)
    assert (ckpt.root / LYRIC_VOCAB_FILENAME).is_file()
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"tiny checkpoint is {size / 2**20:.1f} MiB"


def test_building_is_seeded(built: Path, tmp_path: Path) -> None:
    assert _digest(build_tiny_checkpoint(tmp_path / "again")) == _digest(built)


def test_pipeline_runs_on_it(built: Path) -> None:
    pipeline = Text2MusicPipeline.from_checkpoint(built)
    result = pipeline(GenerationParams(prompt="pop, piano", lyrics="[verse]\n你好 hello\n안녕", audio_duration=2.0,
                                       infer_step=2, actual_seeds=(3,)))
    assert result.waveforms.shape[:2] == (1, 2)
    assert result.waveforms.shape[2] > 48000 * 1.9
    assert abs(result.waveforms).max() > 0
