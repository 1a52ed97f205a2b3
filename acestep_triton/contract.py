"""The generation request, its limits, and the `acestep` ensemble's tensors.

One source of truth, torch-free, read by the in-process pipeline, the Triton
model repository generator, the Triton models and the gateway.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from acestep_triton.geometry import PUBLISHED_GEOMETRY

if TYPE_CHECKING:
    import numpy as np

SCHEDULERS = ("euler", "heun", "pingpong")

# Upstream's generation tasks. audio2audio is upstream's `audio2audio_enable` with a reference audio
# (it overrides the task there); the gateway maps that flag to this task.
TEXT2MUSIC = "text2music"
RETAKE = "retake"
REPAINT = "repaint"
EXTEND = "extend"
EDIT = "edit"
AUDIO2AUDIO = "audio2audio"
TASKS = (TEXT2MUSIC, RETAKE, REPAINT, EXTEND, EDIT, AUDIO2AUDIO)
# The tasks that start from an audio input: the source of repaint/extend/edit, the reference of audio2audio.
AUDIO_INPUT_TASKS = (REPAINT, EXTEND, EDIT, AUDIO2AUDIO)
# `lora_name_or_path` for the base model.
NO_LORA = "none"
CFG_TYPES = ("apg", "cfg", "cfg_star")

MAX_DURATION_S = 240.0
RANDOM_DURATION_RANGE_S = (30.0, 240.0)
MAX_INFER_STEP = 1000
MAX_PROMPT_CHARS = 4096
MAX_LYRICS_CHARS = 16384
MAX_SEEDS = 16
MAX_GUIDANCE_SCALE = 200.0
SEED_RANGE = 2**32
MAX_EDIT_N_AVG = 16
MAX_ADAPTER_NAME_CHARS = 256

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
    # The other tasks (upstream's names and defaults; TASK_FIELDS says which task reads which).
    # The audio a task starts from is not a parameter: it travels as samples (SRC_AUDIO).
    task: str = TEXT2MUSIC
    retake_seeds: tuple[int, ...] = field(default_factory=tuple)
    retake_variance: float = 0.5
    repaint_start: float = 0.0
    repaint_end: float = 0.0
    edit_target_prompt: str = ""
    edit_target_lyrics: str = ""
    edit_n_min: float = 0.0
    edit_n_max: float = 1.0
    edit_n_avg: int = 1
    ref_audio_strength: float = 0.5
    lora_name_or_path: str = NO_LORA
    lora_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in SEED_LISTS:
            object.__setattr__(self, name, tuple(int(s) for s in getattr(self, name)))
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in SEED_LISTS:
            out[name] = list(getattr(self, name))
        return out


# Every field's default: what an absent optional input (TASK_INPUTS) stands for.
FIELD_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                  for f in dataclasses.fields(GenerationParams)}

# The integer-list fields (tuples here, lists on the wire).
SEED_LISTS = ("actual_seeds", "oss_steps", "retake_seeds")

# The fields only the other tasks read (the rest are the contract's text2music fields, which the REST
# contract requires on every request: a task that ignores one of those just ignores it, as upstream).
MODE_FIELDS = frozenset({
    "retake_seeds", "retake_variance", "repaint_start", "repaint_end", "edit_target_prompt", "edit_target_lyrics",
    "edit_n_min", "edit_n_max", "edit_n_avg", "ref_audio_strength",
})

# Which GenerationParams fields each task reads beyond the ones every task reads (COMMON_FIELDS).
# A field outside its task's set must keep its default: the gateway answers 400 naming it otherwise.
# Upstream reads retake_seeds in repaint/extend/edit too (their noise), retake_variance in repaint and
# extend (the noise mix, and the step the loop starts at); edit ignores the guidance shape and ERG.
COMMON_FIELDS = frozenset({"prompt", "lyrics", "infer_step", "guidance_scale", "scheduler_type", "actual_seeds",
                           "task", "lora_name_or_path", "lora_weight"})
_TEXT2MUSIC_GUIDANCE = frozenset({
    "cfg_type", "omega_scale", "guidance_interval", "guidance_interval_decay", "min_guidance_scale", "use_erg_tag",
    "use_erg_lyric", "use_erg_diffusion", "oss_steps", "guidance_scale_text", "guidance_scale_lyric",
})
_REPAINT_FIELDS = _TEXT2MUSIC_GUIDANCE | {"retake_seeds", "retake_variance", "repaint_start", "repaint_end"}
TASK_FIELDS: dict[str, frozenset[str]] = {
    TEXT2MUSIC: COMMON_FIELDS | _TEXT2MUSIC_GUIDANCE | {"audio_duration"},
    RETAKE: COMMON_FIELDS | _TEXT2MUSIC_GUIDANCE | {"audio_duration", "retake_seeds", "retake_variance"},
    REPAINT: COMMON_FIELDS | _REPAINT_FIELDS,
    EXTEND: COMMON_FIELDS | _REPAINT_FIELDS,
    EDIT: COMMON_FIELDS | {"retake_seeds", "edit_target_prompt", "edit_target_lyrics", "edit_n_min", "edit_n_max",
                           "edit_n_avg"},
    AUDIO2AUDIO: COMMON_FIELDS | _TEXT2MUSIC_GUIDANCE | {"ref_audio_strength"},
}


# The GenerationParams fields the sampling loop reads (schedule, guidance, ERG-diffusion, each task's
# schedule and mixing): the ensemble inputs the `diffusion` model takes. The rest is read by
# `preprocess` only (retake_seeds included: preprocess resolves them, as it resolves actual_seeds).
SAMPLING_PARAMS = frozenset({
    "infer_step", "scheduler_type", "omega_scale", "oss_steps", "guidance_scale", "cfg_type", "guidance_interval",
    "guidance_interval_decay", "min_guidance_scale", "guidance_scale_text", "guidance_scale_lyric",
    "use_erg_diffusion", "task", "retake_variance", "repaint_start", "repaint_end", "edit_n_min", "edit_n_max",
    "edit_n_avg", "ref_audio_strength",
})

# Guidance branches: CFG and ERG (specs.ERG_Q_SCALE) evaluate the model under up to
# three conditions. `preprocess` lays out one row per branch in BRANCHES order (the first two,
# or all three with double-condition guidance), and ENCODER_STATES keeps that row order.
COND = "cond"
NULL = "null"
NO_LYRIC = "no_lyric"
BRANCHES = (COND, NULL, NO_LYRIC)
# Flow-edit evaluates the model under the source and the target condition, each with its own
# unconditional row (zero text states, zero lyric ids and mask, no ERG): four rows, in this order.
EDIT_SOURCE = "edit_source"
EDIT_SOURCE_NULL = "edit_source_null"
EDIT_TARGET = "edit_target"
EDIT_TARGET_NULL = "edit_target_null"
EDIT_BRANCHES = (EDIT_SOURCE, EDIT_SOURCE_NULL, EDIT_TARGET, EDIT_TARGET_NULL)


def uses_double_condition(p: GenerationParams) -> bool:
    """Upstream's double-condition guidance: both separate scales above 1 (it then overrides cfg_type)."""
    return p.guidance_scale_text > 1.0 and p.guidance_scale_lyric > 1.0


def condition_branches(p: GenerationParams) -> tuple[str, ...]:
    """The condition rows `preprocess` lays out for `p`, in order: ENCODER_STATES row k is branch k."""
    if p.task == EDIT:
        return EDIT_BRANCHES
    return BRANCHES if uses_double_condition(p) else BRANCHES[:2]


def uses_guidance(p: GenerationParams) -> bool:
    """Upstream evaluates unconditional rows unless guidance_scale is 0 or 1 (every task)."""
    return p.guidance_scale not in (0.0, 1.0)


def source_field(task: str) -> str:
    """The upstream request field that names the audio a task starts from (for errors about it)."""
    return "ref_audio_input" if task == AUDIO2AUDIO else "src_audio_path"


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
    _seed_list("actual_seeds", p.actual_seeds)
    _finite("guidance_interval", p.guidance_interval, 0.0, 1.0)
    _finite("guidance_interval_decay", p.guidance_interval_decay, 0.0, 1.0)
    _finite("min_guidance_scale", p.min_guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    _finite("guidance_scale_text", p.guidance_scale_text, 0.0, MAX_GUIDANCE_SCALE)
    _finite("guidance_scale_lyric", p.guidance_scale_lyric, 0.0, MAX_GUIDANCE_SCALE)
    for name in ("use_erg_tag", "use_erg_lyric", "use_erg_diffusion"):
        if not isinstance(getattr(p, name), bool):
            raise ParameterError(name, "must be a boolean")
    _validate_task_fields(p)
    if p.oss_steps:
        if any(s < 1 for s in p.oss_steps):
            raise ParameterError("oss_steps", "steps must be >= 1")
        if max(p.oss_steps) > MAX_INFER_STEP:
            raise ParameterError("oss_steps", f"steps must be <= {MAX_INFER_STEP}")
        if len(set(p.oss_steps)) != len(p.oss_steps):
            raise ParameterError("oss_steps", "steps must be distinct")
        if p.scheduler_type == "heun":
            raise ParameterError("oss_steps", "not supported with scheduler_type 'heun' (as upstream)")


def _seed_list(name: str, seeds: tuple[int, ...]) -> None:
    if len(seeds) > MAX_SEEDS:
        raise ParameterError(name, f"at most {MAX_SEEDS} seeds")
    for s in seeds:
        if not 0 <= s < SEED_RANGE:
            raise ParameterError(name, f"seeds must be in [0, 2**32), got {s}")


def _validate_task_fields(p: GenerationParams) -> None:
    """The other tasks' fields: ranges, and that a task's unused mode fields keep their defaults.

    Checks that need the source audio's length (a repaint window inside the source, a result of at
    most MAX_DURATION_S) belong to acestep_triton.sampling.tasks, where the length is known.
    """
    if p.task not in TASKS:
        raise ParameterError("task", f"must be one of {list(TASKS)}, got {p.task!r}")
    for name in MODE_FIELDS - TASK_FIELDS[p.task]:
        if getattr(p, name) != FIELD_DEFAULTS[name]:
            raise ParameterError(name, f"is not used by task {p.task!r} (leave it out or at its default)")
    _seed_list("retake_seeds", p.retake_seeds)
    _finite("retake_variance", p.retake_variance, 0.0, 1.0)
    _finite("repaint_start", p.repaint_start, -MAX_DURATION_S, MAX_DURATION_S)
    _finite("repaint_end", p.repaint_end, -MAX_DURATION_S, MAX_DURATION_S)
    if p.task == REPAINT:
        if p.repaint_start < 0:
            raise ParameterError("repaint_start", f"must be >= 0 for repaint (extend reaches before the source), "
                                                  f"got {p.repaint_start}")
        if p.repaint_end <= p.repaint_start:
            raise ParameterError("repaint_end", f"must be greater than repaint_start ({p.repaint_start}), "
                                                f"got {p.repaint_end}")
    if p.task == EXTEND and not (p.repaint_start < 0 or p.repaint_end > 0):
        raise ParameterError("repaint_start", "extend needs repaint_start < 0 (extend left) and/or repaint_end "
                                              "past the source's end (extend right)")
    for name, text, limit in (("edit_target_prompt", p.edit_target_prompt, MAX_PROMPT_CHARS),
                              ("edit_target_lyrics", p.edit_target_lyrics, MAX_LYRICS_CHARS)):
        if not isinstance(text, str):
            raise ParameterError(name, "must be a string")
        if len(text) > limit:
            raise ParameterError(name, f"longer than {limit} characters")
    _finite("edit_n_min", p.edit_n_min, 0.0, 1.0)
    _finite("edit_n_max", p.edit_n_max, 0.0, 1.0)
    if p.edit_n_min > p.edit_n_max:
        raise ParameterError("edit_n_min", f"must be <= edit_n_max ({p.edit_n_max}), got {p.edit_n_min}")
    if isinstance(p.edit_n_avg, bool) or not isinstance(p.edit_n_avg, int):
        raise ParameterError("edit_n_avg", "must be an integer")
    if not 1 <= p.edit_n_avg <= MAX_EDIT_N_AVG:
        raise ParameterError("edit_n_avg", f"must be in [1, {MAX_EDIT_N_AVG}], got {p.edit_n_avg}")
    _finite("ref_audio_strength", p.ref_audio_strength, 0.0, 1.0)
    _finite("lora_weight", p.lora_weight, 0.0, 1.0)
    if not isinstance(p.lora_name_or_path, str) or not p.lora_name_or_path:
        raise ParameterError("lora_name_or_path", f"must be {NO_LORA!r} or an adapter name")
    if len(p.lora_name_or_path) > MAX_ADAPTER_NAME_CHARS:
        raise ParameterError("lora_name_or_path", f"longer than {MAX_ADAPTER_NAME_CHARS} characters")


def validate_source(p: GenerationParams, source: SourceAudio | None) -> None:
    """Raise ParameterError naming the field when the audio input does not fit the request.

    A task in AUDIO_INPUT_TASKS needs one (mono or stereo, at most MAX_DURATION_S); a repaint window
    lies inside the source, in latent frames as upstream rounds them (a window of all the source's
    frames is upstream's retake); extend pads at most the source's length on each side (the added
    frames' noise is cut from a source-length draw) and its result is at most MAX_DURATION_S.
    Torch-free, so the gateway refuses a bad request before it is queued, with the checks the
    engine makes.
    """
    name = source_field(p.task)
    if p.task not in AUDIO_INPUT_TASKS:
        if source is not None:
            raise ParameterError(name, f"task {p.task!r} takes no audio input")
        return
    if source is None:
        raise ParameterError(name, f"task {p.task!r} needs an audio input")
    if source.samples.ndim != 2 or source.samples.shape[0] not in (1, 2) or source.samples.shape[1] == 0:
        raise ParameterError(name, f"audio must be [channels 1 or 2, samples > 0], got {source.samples.shape}")
    if source.sample_rate <= 0:
        raise ParameterError(name, f"sample rate must be positive, got {source.sample_rate}")
    seconds = source.samples.shape[1] / source.sample_rate
    if seconds > MAX_DURATION_S:
        raise ParameterError(name, f"audio is {seconds:.2f} s long, at most {MAX_DURATION_S:g} s")
    geometry = PUBLISHED_GEOMETRY
    frames = geometry.source_frames(source.samples.shape[1], source.sample_rate)
    start, end = geometry.frames(p.repaint_start), geometry.frames(p.repaint_end)
    if p.task == REPAINT:
        if end > frames:
            raise ParameterError("repaint_end", f"must lie inside the source ({frames * geometry.frame_seconds:.3f} s"
                                                f" = {frames} latent frames), got {p.repaint_end}; extend reaches past it")
        if end <= start:
            raise ParameterError("repaint_end", f"the window {p.repaint_start}-{p.repaint_end} s covers no whole "
                                                f"latent frame ({geometry.frame_seconds:.4f} s)")
    if p.task == EXTEND:
        left, right = max(0, -start), max(0, end - frames)
        if left + right == 0:
            raise ParameterError("repaint_start", "extend needs repaint_start < 0 and/or repaint_end past the "
                                                  f"source's end ({frames * geometry.frame_seconds:.3f} s), by at "
                                                  "least one latent frame")
        for field_name, pad in (("repaint_start", left), ("repaint_end", right)):
            if pad > frames:
                raise ParameterError(field_name, f"extends by {pad} latent frames, more than the source's {frames}")
        if frames + left + right > geometry.frames(MAX_DURATION_S):
            raise ParameterError("repaint_end" if right else "repaint_start",
                                 f"the extended result would be longer than {MAX_DURATION_S:g} s")


@dataclass(frozen=True)
class TensorSpec:
    """One named Triton tensor: dtype in Triton's spelling, dims without the batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    param: str = ""
    optional: bool = False


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
# The other tasks' inputs: optional, an absent one keeps its GenerationParams default (a text2music
# request sends none of them).
TASK_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("TASK", "TYPE_STRING", (1,), "task", optional=True),
    TensorSpec("RETAKE_SEEDS", "TYPE_INT64", (-1,), "retake_seeds", optional=True),
    TensorSpec("RETAKE_VARIANCE", "TYPE_FP32", (1,), "retake_variance", optional=True),
    TensorSpec("REPAINT_START", "TYPE_FP32", (1,), "repaint_start", optional=True),
    TensorSpec("REPAINT_END", "TYPE_FP32", (1,), "repaint_end", optional=True),
    TensorSpec("EDIT_TARGET_PROMPT", "TYPE_STRING", (1,), "edit_target_prompt", optional=True),
    TensorSpec("EDIT_TARGET_LYRICS", "TYPE_STRING", (1,), "edit_target_lyrics", optional=True),
    TensorSpec("EDIT_N_MIN", "TYPE_FP32", (1,), "edit_n_min", optional=True),
    TensorSpec("EDIT_N_MAX", "TYPE_FP32", (1,), "edit_n_max", optional=True),
    TensorSpec("EDIT_N_AVG", "TYPE_INT32", (1,), "edit_n_avg", optional=True),
    TensorSpec("REF_AUDIO_STRENGTH", "TYPE_FP32", (1,), "ref_audio_strength", optional=True),
    TensorSpec("LORA_NAME_OR_PATH", "TYPE_STRING", (1,), "lora_name_or_path", optional=True),
    TensorSpec("LORA_WEIGHT", "TYPE_FP32", (1,), "lora_weight", optional=True),
    # The audio the task starts from (AUDIO_INPUT_TASKS): [channels (1 or 2), samples] at SRC_SAMPLE_RATE Hz,
    # as decoded from the file; the source of repaint/extend/edit, the reference of audio2audio.
    TensorSpec("SRC_AUDIO", "TYPE_FP32", (-1, -1), optional=True),
    TensorSpec("SRC_SAMPLE_RATE", "TYPE_INT32", (1,), optional=True),
)
# The TASK_INPUTS that carry the source audio (no GenerationParams field: contract.SourceAudio).
SOURCE_INPUTS = ("SRC_AUDIO", "SRC_SAMPLE_RATE")

@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced, in process (pipeline) or through Triton (ensemble_client).

    waveforms: [items, 2, samples] float32 at OUTPUT_SAMPLE_RATE, one item per seed.
    seeds: the seed each item was drawn with (len == items).
    duration: the target duration in seconds (a requested -1 resolved); the waveform is that
        rounded down to whole latent frames. For the tasks that start from audio: the length of
        the source's latents (extend: with the added frames), which the waveform has exactly.
    timings: seconds per stage, keyed by STAGES (a deployment of TensorRT plans leaves out the
        stages that cannot time themselves).
    connect_seconds: seconds spent building a Triton client for this request (0 when reused or
        in process).
    retake_seeds: the retake seed of each item (drawn where not given, like seeds); empty for an
        engine that does not report them.
    """

    waveforms: np.ndarray
    seeds: tuple[int, ...]
    duration: float
    timings: dict[str, float]
    connect_seconds: float = 0.0
    retake_seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class SourceAudio:
    """The audio a task starts from (AUDIO_INPUT_TASKS), as decoded from its file.

    samples: [channels (1 or 2), n] float32 at `sample_rate` Hz; mono is duplicated to stereo
        where it is encoded, as upstream's load_audio does.
    """

    samples: np.ndarray
    sample_rate: int


# WAVEFORM holds one 48 kHz stereo item per seed (one item when no seed is given),
# SEEDS the seed each item was drawn with, RETAKE_SEEDS_USED the retake seed of each item (drawn
# where not given, as SEEDS are), DURATION the seconds actually generated (a source's length for
# the tasks that start from one).
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
    TensorSpec("RETAKE_SEEDS_USED", "TYPE_INT64", (-1,)),
    TensorSpec("DURATION", "TYPE_FP32", (1,)),
) + tuple(TensorSpec(stage_time_name(s), "TYPE_FP32", (-1, 1)) for s in STAGES)

# `acestep_stream`: the same stages as the ensemble in one decoupled model, for clients that want
# progress and cancellation (gRPC streaming). Every response but the last carries PROGRESS_OUTPUTS:
# STAGE (the stage starting, or "diffusion" after each step), STEP (steps done) and STEPS (all
# steps); the last carries the ensemble's outputs.
STREAM_MODEL_NAME = "acestep_stream"
# gRPC streams carry an error as text only (tritonclient's stream gives no status code), so the
# stream's final error says its Triton code first: "[INVALID_ARG] repaint_end: ...".
STREAM_ERROR_CODES = ("INVALID_ARG", "NOT_FOUND", "UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN", "UNSUPPORTED",
                      "ALREADY_EXISTS")


def stream_error_text(code: str, message: str) -> str:
    """The text of a stream's final error with Triton code name `code` (one of STREAM_ERROR_CODES)."""
    return f"[{code}] {message}"


def parse_stream_error(text: str) -> tuple[str, str]:
    """(code name, message) of a stream error's text; ("UNKNOWN", text) when it names no code."""
    code, sep, message = text.partition("] ")
    if text.startswith("[") and sep and code[1:] in STREAM_ERROR_CODES:
        return code[1:], message
    return "UNKNOWN", text


PROGRESS_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("STAGE", "TYPE_STRING", (1,)),
    TensorSpec("STEP", "TYPE_INT32", (1,)),
    TensorSpec("STEPS", "TYPE_INT32", (1,)),
)
# With STREAM_AUDIO true the vocoder runs in chunks (models.vocoder.aligned_chunks) and each chunk's
# audio comes as it is decoded, in a vocoder-stage response that also carries AUDIO [items, 2, n]
# (48 kHz), AUDIO_OFFSET (its first sample) and AUDIO_SAMPLES (the whole waveform's length). The
# chunks tile the waveform in order; the final WAVEFORM is their concatenation.
STREAM_AUDIO = TensorSpec("STREAM_AUDIO", "TYPE_BOOL", (1,), optional=True)
STREAM_INPUTS: tuple[TensorSpec, ...] = (STREAM_AUDIO,)
AUDIO_CHUNK = TensorSpec("AUDIO", "TYPE_FP32", (-1, 2, -1))
AUDIO_OFFSET = TensorSpec("AUDIO_OFFSET", "TYPE_INT64", (1,))
AUDIO_SAMPLES = TensorSpec("AUDIO_SAMPLES", "TYPE_INT64", (1,))
AUDIO_CHUNK_OUTPUTS: tuple[TensorSpec, ...] = (AUDIO_CHUNK, AUDIO_OFFSET, AUDIO_SAMPLES)
# Mel frames per streamed chunk, before rounding to whole blocks of frames at which 44.1 kHz and
# 48 kHz samples line up (147 frames, 1.7 s): 588 frames, 6.8 s of audio.
STREAM_CHUNK_FRAMES = 588
