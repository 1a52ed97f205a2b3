"""The pinned serving-stack versions from `versions.env` at the repository root (torch-free).

One file holds them so the Dockerfile, compose, the export chain and the README cannot drift.
"""

from __future__ import annotations

from pathlib import Path

VERSIONS_FILE = Path(__file__).resolve().parents[1] / "versions.env"


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """KEY=VALUE lines of `path`; blank lines and `#` comments are skipped."""
    versions = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        versions[key] = value
    return versions


_VERSIONS = read_versions()
TRITON_IMAGE = _VERSIONS["TRITON_IMAGE"]
TRITON_SERVER_VERSION = _VERSIONS["TRITON_SERVER_VERSION"]
TENSORRT_VERSION = _VERSIONS["TENSORRT_VERSION"]
ONNXRUNTIME_VERSION = _VERSIONS["ONNXRUNTIME_VERSION"]
ONNX_OPSET = int(_VERSIONS["ONNX_OPSET"])
