"""The outputs directory: file names, atomic writes, sidecars and safe look-ups."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from acestep_triton.contract import ParameterError
from gateway.errors import OutputNotFound
from gateway.formats import choose_encoding

# One path segment of plain ASCII (names travel in HTTP headers), never hidden:
# no separators, no '..', no temp files (which start with '.').
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
SIDECAR_SUFFIX = "_input_params.json"
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".part"  # a write in progress, renamed to its final name when complete


def encode_wav(waveform: np.ndarray, sample_rate: int) -> bytes:
    """A WAV file of 32-bit float samples (the contract's default format); waveform [channels, samples]."""
    return choose_encoding("wav").encode(waveform, sample_rate)


class OutputStore:
    """Owns the outputs directory; every name is checked before a path is made from it."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    @staticmethod
    def new_audio_name(suffix: str = ".wav") -> str:
        return f"output_{uuid.uuid4().hex}{suffix}"

    def check_audio_name(self, name: str, suffix: str = ".wav", field: str = "output_path") -> str:
        """`name` if it can be written here as an audio file ending in `suffix` (the format's), else
        ParameterError naming `field`."""
        if not _SAFE_NAME.fullmatch(name):
            raise ParameterError(
                field,
                "must be a plain file name inside the outputs directory "
                "(letters, digits, '.', '_', '-'; no directories, no leading '.')",
            )
        if not name.lower().endswith(suffix):
            raise ParameterError(field, f"must end with {suffix}, the suffix of the requested format")
        target = self.root / name
        if target.is_dir() and not target.is_symlink():
            raise ParameterError(field, f"{name!r} is a directory in the outputs directory")
        return name

    @staticmethod
    def item_names(name: str, count: int) -> list[str]:
        """Names for `count` items: `name` for the first, `<stem>_<i><suffix>` for item i >= 1."""
        stem, suffix = os.path.splitext(name)
        return [name] + [f"{stem}_{i}{suffix}" for i in range(1, count)]

    @staticmethod
    def sidecar_name(audio_name: str) -> str:
        return os.path.splitext(audio_name)[0] + SIDECAR_SUFFIX

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write `data` to `name` atomically: a temp file in the same directory, then os.replace."""
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"unsafe output name {name!r}")
        target = self.root / name
        fd, temp_path = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp_path, target)
        except BaseException:
            Path(temp_path).unlink(missing_ok=True)
            raise
        return target

    def remove_partial_writes(self) -> list[str]:
        """Remove the temporary files of writes a process did not finish (killed mid-write); their names."""
        partial = sorted(p.name for p in self.root.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}") if p.is_file())
        for name in partial:
            (self.root / name).unlink(missing_ok=True)
        return partial

    def write_json(self, name: str, record: dict[str, Any]) -> Path:
        text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
        return self.write_bytes(name, text.encode("utf-8"))

    def lookup(self, name: str) -> Path:
        """The regular file `name` directly inside the outputs directory (symlinks resolved and confined)."""
        return find_file(self.root, name, "filename", "outputs directory")


def find_file(root: Path, name: str, field: str, where: str) -> Path:
    """The regular file `name` directly inside the resolved directory `root` (called `where` in errors):
    ParameterError naming `field` for an unsafe name, OutputNotFound when there is no such file."""
    if not is_safe_name(name):
        raise ParameterError(field, f"must be a plain file name inside the {where}")
    path = confined_file(root, name)
    if path is None:
        raise OutputNotFound(f"{field}: no file {name!r} in the {where}")
    return path


def is_safe_name(name: str) -> bool:
    """A plain, visible file name of at most 200 ASCII characters (letters, digits, '.', '_', '-')."""
    return _SAFE_NAME.fullmatch(name) is not None


def confined_file(root: Path, name: str) -> Path | None:
    """The regular file `name` (a safe name) directly inside the resolved directory `root`, symlinks
    resolved and confined to it; None when there is none."""
    path = (root / name).resolve()
    return path if path.parent == root and path.is_file() else None
