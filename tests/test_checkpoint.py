"""Checkpoint layout: validation errors name what is wrong; offline download fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from acestep_triton.checkpoint import (
    LYRIC_VOCAB_ENV,
    CheckpointError,
    download_checkpoint,
    find_lyric_vocab,
    validate_checkpoint,
)


@pytest.fixture
def ckpt_copy(golden_ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_ckpt, dst)
    return dst


def test_golden_checkpoint_is_valid(golden_ckpt: Path) -> None:
    ckpt = validate_checkpoint(golden_ckpt)
    assert ckpt.transformer.name == "ace_step_transformer"
    assert ckpt.config("umt5-base")["d_model"] == 32


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        validate_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("music_vocoder", "missing folder music_vocoder/"),
        ("ace_step_transformer/diffusion_pytorch_model.safetensors",
         "missing ace_step_transformer/diffusion_pytorch_model.safetensors"),
        ("umt5-base/tokenizer.json", "missing umt5-base/tokenizer.json"),
        ("music_dcae_f8c8/config.json", "missing music_dcae_f8c8/config.json"),
    ],
)
def test_incomplete_checkpoint_names_the_missing_part(ckpt_copy: Path, remove: str, message: str) -> None:
    target = ckpt_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(ckpt_copy)


def test_wrong_config(ckpt_copy: Path) -> None:
    config_path = ckpt_copy / "ace_step_transformer" / "config.json"
    config = json.loads(config_path.read_text())
    del config["inner_dim"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="ace_step_transformer/config.json lacks inner_dim"):
        validate_checkpoint(ckpt_copy)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        validate_checkpoint(ckpt_copy)


def test_lyric_vocab_lookup(ckpt_copy: Path, lyric_vocab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = validate_checkpoint(ckpt_copy)
    monkeypatch.delenv(LYRIC_VOCAB_ENV, raising=False)
    with pytest.raises(CheckpointError, match="no lyric vocabulary found"):
        find_lyric_vocab(ckpt)
    assert find_lyric_vocab(ckpt, lyric_vocab) == lyric_vocab
    monkeypatch.setenv(LYRIC_VOCAB_ENV, str(lyric_vocab))
    assert find_lyric_vocab(ckpt) == lyric_vocab


def test_download_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download ACE-Step/ACE-Step-v1-3.5B"):
        download_checkpoint(tmp_path / "dl")
