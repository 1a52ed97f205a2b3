"""Session fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CASES = ("a_euler_apg_erg", "b_heun_cfg_noerg", "e_empty_lyrics")


def _golden_dir() -> Path:
    return Path(os.environ.get("ACESTEP_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = _golden_dir()
    if not (path / "MANIFEST.json").is_file():
        pytest.fail(f"golden data not found at {path} (set ACESTEP_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir: Path) -> Path:
    return golden_dir / "tiny-ckpt"


@pytest.fixture(scope="session")
def lyric_vocab(golden_dir: Path) -> Path:
    return golden_dir / "lyric_vocab.json"
