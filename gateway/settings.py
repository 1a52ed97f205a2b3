"""Gateway settings, read from the environment once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from acestep_triton.contract import MAX_DURATION_S

Number = TypeVar("Number", int, float)

PROTOCOLS = ("grpc", "http")
PRECISIONS = ("bf16", "fp32")
DEFAULT_TRITON_URL = {"grpc": "localhost:8001", "http": "localhost:8000"}
# Uploads live in a hidden folder of the outputs directory by default: one volume to mount, and
# /download and the outputs' retention never see them (both skip hidden names).
UPLOADS_SUBDIR = ".uploads"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """An environment variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Settings:
    """What the gateway talks to and what the deployment behind it serves.

    `checkpoint_path`, `bf16`, `torch_compile` and `device_id` describe the
    deployment: requests naming other values are refused, never re-routed.
    `uploads_dir` None means `<outputs_dir>/.uploads`.
    """

    checkpoint_path: str
    triton_url: str = DEFAULT_TRITON_URL["grpc"]
    triton_protocol: str = "grpc"
    triton_timeout_s: float = 600.0
    outputs_dir: Path = Path("outputs")
    host: str = "0.0.0.0"
    port: int = 8000
    bf16: bool = False
    torch_compile: bool = False
    device_id: int = 0
    api_key: str | None = None
    max_pending_jobs: int = 16
    max_running_jobs: int = 4
    job_deadline_s: float = 600.0
    retention_s: float = 7 * 24 * 3600.0
    retention_interval_s: float = 600.0
    uploads_dir: Path | None = None
    max_upload_bytes: int = 64 * 2**20
    max_upload_s: float = MAX_DURATION_S
    upload_retention_s: float = 24 * 3600.0
    stream_job_audio: bool = True
    shutdown_deadline_s: float = 25.0
    health_interval_s: float = 1.0
    probe_timeout_s: float = 10.0
    recovery_estimate_s: float = 10.0
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs_dir", Path(self.outputs_dir))
        uploads = self.outputs_dir / UPLOADS_SUBDIR if self.uploads_dir is None else Path(self.uploads_dir)
        object.__setattr__(self, "uploads_dir", uploads)
        if self.triton_protocol not in PROTOCOLS:
            raise SettingsError(f"triton_protocol must be one of {list(PROTOCOLS)}, got {self.triton_protocol!r}")
        if "://" in self.triton_url:
            raise SettingsError(f"triton_url is host:port without a scheme, got {self.triton_url!r}")
        if not self.checkpoint_path:
            raise SettingsError("checkpoint_path (ACESTEP_CHECKPOINT_PATH) is required")
        if self.triton_timeout_s <= 0:
            raise SettingsError("triton_timeout_s must be positive")
        for name in ("max_pending_jobs", "max_running_jobs", "job_deadline_s", "retention_s", "retention_interval_s",
                     "max_upload_bytes", "upload_retention_s", "shutdown_deadline_s", "health_interval_s",
                     "probe_timeout_s", "recovery_estimate_s", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if not 0 < self.max_upload_s <= MAX_DURATION_S:
            raise SettingsError(f"max_upload_s must be in (0, {MAX_DURATION_S:g}] (no result is longer)")
        if self.max_running_jobs > self.max_pending_jobs:
            raise SettingsError("max_running_jobs must not exceed max_pending_jobs")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read `ACESTEP_*` variables (see README, 'Gateway settings')."""
        protocol = environ.get("ACESTEP_TRITON_PROTOCOL", "grpc")
        if protocol not in PROTOCOLS:
            raise SettingsError(f"ACESTEP_TRITON_PROTOCOL must be one of {list(PROTOCOLS)}, got {protocol!r}")
        precision = environ.get("ACESTEP_PRECISION", "fp32")
        if precision not in PRECISIONS:
            raise SettingsError(f"ACESTEP_PRECISION must be one of {list(PRECISIONS)}, got {precision!r}")
        return cls(
            checkpoint_path=environ.get("ACESTEP_CHECKPOINT_PATH", ""),
            triton_url=environ.get("ACESTEP_TRITON_URL", DEFAULT_TRITON_URL[protocol]),
            triton_protocol=protocol,
            triton_timeout_s=_number(environ, "ACESTEP_TRITON_TIMEOUT_S", 600.0, float),
            outputs_dir=Path(environ.get("ACESTEP_OUTPUTS_DIR", "outputs")),
            host=environ.get("ACESTEP_HOST", "0.0.0.0"),
            port=_number(environ, "ACESTEP_PORT", 8000, int),
            bf16=precision == "bf16",
            torch_compile=_flag(environ, "ACESTEP_TORCH_COMPILE", False),
            device_id=_number(environ, "ACESTEP_DEVICE_ID", 0, int),
            api_key=environ.get("ACESTEP_API_KEY") or None,
            max_pending_jobs=_number(environ, "ACESTEP_MAX_PENDING_JOBS", 16, int),
            max_running_jobs=_number(environ, "ACESTEP_MAX_RUNNING_JOBS", 4, int),
            job_deadline_s=_number(environ, "ACESTEP_JOB_DEADLINE_S", 600.0, float),
            retention_s=_number(environ, "ACESTEP_RETENTION_S", 7 * 24 * 3600.0, float),
            retention_interval_s=_number(environ, "ACESTEP_RETENTION_INTERVAL_S", 600.0, float),
            uploads_dir=Path(environ["ACESTEP_UPLOADS_DIR"]) if environ.get("ACESTEP_UPLOADS_DIR") else None,
            max_upload_bytes=_number(environ, "ACESTEP_MAX_UPLOAD_BYTES", 64 * 2**20, int),
            max_upload_s=_number(environ, "ACESTEP_MAX_UPLOAD_S", MAX_DURATION_S, float),
            upload_retention_s=_number(environ, "ACESTEP_UPLOAD_RETENTION_S", 24 * 3600.0, float),
            stream_job_audio=_flag(environ, "ACESTEP_STREAM_JOB_AUDIO", True),
            shutdown_deadline_s=_number(environ, "ACESTEP_SHUTDOWN_DEADLINE_S", 25.0, float),
            health_interval_s=_number(environ, "ACESTEP_HEALTH_INTERVAL_S", 1.0, float),
            probe_timeout_s=_number(environ, "ACESTEP_PROBE_TIMEOUT_S", 10.0, float),
            recovery_estimate_s=_number(environ, "ACESTEP_RECOVERY_ESTIMATE_S", 10.0, float),
            max_body_bytes=_number(environ, "ACESTEP_MAX_BODY_BYTES", 1 << 20, int),
            cors_origins=tuple(o.strip() for o in environ.get("ACESTEP_CORS_ORIGINS", "").split(",") if o.strip()),
        )


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of {list(_TRUE + _FALSE)}, got {raw!r}")


def _number(environ: Mapping[str, str], name: str, default: Number, kind: type[Number]) -> Number:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
