"""The generation request, its limits, and the `acestep` ensemble's tensors.

One source of truth, torch-free, read by the in-process pipeline, the Triton
model repository generator, the Triton models and the gateway.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from acestep_triton.geometry import PUBLISHED_GEOMETRY

if TYPE_CHECKING:
    import numpy as np

SCHEDULERS = ("euler", "heun", "pingpong")
CFG_TYPES = ("apg", "cfg", "cfg_star")

MAX_DURATION_S = 240.0
RANDOM_DURATION_RANGE_S = (30.0, 240.0)
MAX_INFER_STEP = 1000
MAX_PROMPT_CHARS = 4096
MAX_LYRICS_CHARS = 16384
MAX_SEEDS = 16
MAX_GUIDANCE_SCALE = 200.0
SEED_RANGE = 2**32

OUTPUT_SAMPLE_RATE = 48000


class ParameterError(ValueError):
    """A request field is invalid; `field` names it, the message says why."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class GenerationParams:
    """The contract's text2music parameters (seed README, 'Request Parameters')."""

    prompt: str
    lyrics: str
    audio_duration: float = 60.0
    infer_step: int = 60
    guidance_scale: float = 15.0
    scheduler_type: str = "euler"
    cfg_type: str = "apg"
    omega_scale: float = 10.0
    actual_seeds: tuple[int, ...] = field(default_factory=tuple)
    guidance_interval: float = 0.5
    guidance_interval_decay: float = 0.0
    min_guidance_scale: float = 3.0
    use_erg_tag: bool = True
    use_erg_lyric: bool = True
    use_erg_diffusion: bool = True
    oss_steps: tuple[int, ...] = field(default_factory=tuple)
    guidance_scale_text: float = 0.0
    guidance_scale_lyric: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "actual_seeds", tuple(int(s) for s in self.actual_seeds))
        object.__setattr__(self, "oss_steps", tuple(int(s) for s in self.oss_steps))
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["actual_seeds"] = list(self.actual_seeds)
        out["oss_steps"] = list(self.oss_steps)
        return out


# The GenerationParams fields the sampling loop reads (schedule, guidance, ERG-diffusion): the
# ensemble inputs the `diffusion` model takes. The rest is read by `preprocess` only.
SAMPLING_PARAMS = frozenset({
    "infer_step", "scheduler_type", "omega_scale", "oss_steps", "guidance_scale", "cfg_type", "guidance_interval",
    "guidance_interval_decay", "min_guidance_scale", "guidance_scale_text", "guidance_scale_lyric",
    "use_erg_diffusion",
})

# Guidance branches: CFG and ERG (specs.ERG_Q_SCALE) evaluate the model under up to
# three conditions. `preprocess` lays out one row per branch in BRANCHES order (the first two,
# or all three with double-condition guidance), and ENCODER_STATES keeps that row order.
COND = "cond"
NULL = "null"
NO_LYRIC = "no_lyric"
BRANCHES = (COND, NULL, NO_LYRIC)


def uses_double_condition(p: GenerationParams) -> bool:
    """Upstream's double-condition guidance: both separate scales above 1 (it then overrides cfg_type)."""
    return p.guidance_scale_text > 1.0 and p.guidance_scale_lyric > 1.0


def _finite(name: str, value: float, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ParameterError(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ParameterError(name, "must be finite")
    if not low <= value <= high:
        raise ParameterError(name, f"must be in [{low}, {high}], got {value}")


def validate(p: GenerationParams) -> None:
    """Raise ParameterError naming the first invalid field."""
    if not isinstance(p.prompt, str):
        raise ParameterError("prompt", "must be a string")
    if len(p.prompt) > MAX_PROMPT_CHARS:
        raise ParameterError("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    if not isinstance(p.lyrics, str):
        raise ParameterError("lyrics", "must be a string")
    if len(p.lyrics) > MAX_LYRICS_CHARS:
        raise ParameterError("lyrics", f"longer than {MAX_LYRICS_CHARS} characters")
    _finite("audio_duration", p.audio_duration, -1.0, MAX_DURATION_S)
    if p.audio_duration != -1 and p.audio_duration <= 0:
        raise ParameterError("audio_duration", "must be -1 (random 30-240 s) or in (0, 240]")
    if p.audio_duration != -1 and PUBLISHED_GEOMETRY.frames(p.audio_duration) < 1:
        raise ParameterError("audio_duration", f"must give at least one latent frame "
                                               f"({PUBLISHED_GEOMETRY.frame_seconds:.4f} s), got {p.audio_duration}")
    if isinstance(p.infer_step, bool) or not isinstance(p.infer_step, int):
        raise ParameterError("infer_step", "must be an integer")
    if not 1 <= p.infer_step <= MAX_INFER_STEP:
        raise ParameterError("infer_step", f"must be in [1, {MAX_INFER_STEP}], got {p.infer_step}")
    _finite("guidance_scale", p.guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    if p.scheduler_type not in SCHEDULERS:
        raise ParameterError("scheduler_type", f"must be one of {list(SCHEDULERS)}, got {p.scheduler_type!r}")
    if p.cfg_type not in CFG_TYPES:
        raise ParameterError("cfg_type", f"must be one of {list(CFG_TYPES)}, got {p.cfg_type!r}")
    _finite("omega_scale", p.omega_scale, -1000.0, 1000.0)
    if len(p.actual_seeds) > MAX_SEEDS:
        raise ParameterError("actual_seeds", f"at most {MAX_SEEDS} seeds")
    for s in p.actual_seeds:
        if not 0 <= s < SEED_RANGE:
            raise ParameterError("actual_seeds", f"seeds must be in [0, 2**32), got {s}")
    _finite("guidance_interval", p.guidance_interval, 0.0, 1.0)
    _finite("guidance_interval_decay", p.guidance_interval_decay, 0.0, 1.0)
    _finite("min_guidance_scale", p.min_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    _finite("guidance_scale_text", p.guidance_scale_text, 0.0, MAX_GUIDANCE_SCALE)
    _finite("guidance_scale_lyric", p.guidance_scale_lyric, 0.0, MAX_GUIDANCE_SCALE)
    for name in ("use_erg_tag", "use_erg_lyric", "use_erg_diffusion"):
        if not isinstance(getattr(p, name), bool):
            raise ParameterError(name, "must be a boolean")
    if p.oss_steps:
        if any(s < 1 for s in p.oss_steps):
            raise ParameterError("oss_steps", "steps must be >= 1")
        if max(p.oss_steps) > MAX_INFER_STEP:
            raise ParameterError("oss_steps", f"steps must be <= {MAX_INFER_STEP}")
        if len(set(p.oss_steps)) != len(p.oss_steps):
            raise ParameterError("oss_steps", "steps must be distinct")
        if p.scheduler_type == "heun":
            raise ParameterError("oss_steps", "not supported with scheduler_type 'heun' (as upstream)")


@dataclass(frozen=True)
class TensorSpec:
    """One named Triton tensor: dtype in Triton's spelling, dims without the batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    param: str = ""


# The `acestep` ensemble, as direct Triton clients and the gateway see it.
# `param` maps an input to its GenerationParams field.
ENSEMBLE_NAME = "acestep"
ENSEMBLE_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("PROMPT", "TYPE_STRING", (1,), "prompt"),
    TensorSpec("LYRICS", "TYPE_STRING", (1,), "lyrics"),
    TensorSpec("AUDIO_DURATION", "TYPE_FP32", (1,), "audio_duration"),
    TensorSpec("INFER_STEP", "TYPE_INT32", (1,), "infer_step"),
    TensorSpec("GUIDANCE_SCALE", "TYPE_FP32", (1,), "guidance_scale"),
    TensorSpec("SCHEDULER_TYPE", "TYPE_STRING", (1,), "scheduler_type"),
    TensorSpec("CFG_TYPE", "TYPE_STRING", (1,), "cfg_type"),
    TensorSpec("OMEGA_SCALE", "TYPE_FP32", (1,), "omega_scale"),
    TensorSpec("ACTUAL_SEEDS", "TYPE_INT64", (-1,), "actual_seeds"),
    TensorSpec("GUIDANCE_INTERVAL", "TYPE_FP32", (1,), "guidance_interval"),
    TensorSpec("GUIDANCE_INTERVAL_DECAY", "TYPE_FP32", (1,), "guidance_interval_decay"),
    TensorSpec("MIN_GUIDANCE_SCALE", "TYPE_FP32", (1,), "min_guidance_scale"),
    TensorSpec("USE_ERG_TAG", "TYPE_BOOL", (1,), "use_erg_tag"),
    TensorSpec("USE_ERG_LYRIC", "TYPE_BOOL", (1,), "use_erg_lyric"),
    TensorSpec("USE_ERG_DIFFUSION", "TYPE_BOOL", (1,), "use_erg_diffusion"),
    TensorSpec("OSS_STEPS", "TYPE_INT32", (-1,), "oss_steps"),
    TensorSpec("GUIDANCE_SCALE_TEXT", "TYPE_FP32", (1,), "guidance_scale_text"),
    TensorSpec("GUIDANCE_SCALE_LYRIC", "TYPE_FP32", (1,), "guidance_scale_lyric"),
)

@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced, in process (pipeline) or through Triton (ensemble_client).

    waveforms: [items, 2, samples] float32 at OUTPUT_SAMPLE_RATE, one item per seed.
    seeds: the seed each item was drawn with (len == items).
    duration: the target duration in seconds (a requested -1 resolved); the waveform is that
        rounded down to whole latent frames.
    timings: seconds per stage, keyed by STAGES (a deployment of TensorRT plans leaves out the
        stages that cannot time themselves).
    connect_seconds: seconds spent building a Triton client for this request (0 when reused or
        in process).
    """

    waveforms: np.ndarray
    seeds: tuple[int, ...]
    duration: float
    timings: dict[str, float]
    connect_seconds: float = 0.0


# WAVEFORM holds one 48 kHz stereo item per seed (one item when no seed is given),
# SEEDS the seed each item was drawn with, DURATION the seconds actually generated.
# TIME_<STAGE> is one row per row of that stage's batch, all equal (engines that cannot
# time themselves, TensorRT plans, leave theirs out).
# Stage names, in pipeline order; each stage reports its seconds as TIME_<STAGE>.
STAGES = ("preprocess", "text_encoder", "condition_encoder", "diffusion", "dcae_decoder", "vocoder")


def stage_time_name(stage: str) -> str:
    """The output that carries `stage`'s seconds."""
    return f"TIME_{stage.upper()}"


ENSEMBLE_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("WAVEFORM", "TYPE_FP32", (-1, 2, -1)),
    TensorSpec("SEEDS", "TYPE_INT64", (-1,)),
    TensorSpec("DURATION", "TYPE_FP32", (1,)),
) + tuple(TensorSpec(stage_time_name(s), "TYPE_FP32", (-1, 1)) for s in STAGES)

# `acestep_stream`: the same stages as the ensemble in one decoupled model, for clients that want
# progress and cancellation (gRPC streaming). Every response but the last carries PROGRESS_OUTPUTS:
# STAGE (the stage starting, or "diffusion" after each step), STEP (steps done) and STEPS (all
# steps); the last carries the ensemble's outputs.
STREAM_MODEL_NAME = "acestep_stream"
PROGRESS_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("STAGE", "TYPE_STRING", (1,)),
    TensorSpec("STEP", "TYPE_INT32", (1,)),
    TensorSpec("STEPS", "TYPE_INT32", (1,)),
)
