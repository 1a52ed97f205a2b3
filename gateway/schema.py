"""The REST contract as pydantic models: what /docs shows and what requests are checked against.

Types are strict (no "60" for an integer, no 1 for a boolean); ranges and
choices are checked by acestep_triton.contract.validate, the one place that
knows the limits (the OpenAPI schema shows them, read from the contract's
constants, without pydantic enforcing them a second time). What only the
gateway knows is checked here: the fields that name source audio and
audio2audio_enable, which upstream turns into the audio2audio task.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from acestep_triton.contract import (
    AUDIO2AUDIO,
    AUDIO_INPUT_TASKS,
    CFG_TYPES,
    MAX_ADAPTER_NAME_CHARS,
    MAX_DURATION_S,
    MAX_EDIT_N_AVG,
    MAX_SEEDS,
    NO_LORA,
    SCHEDULERS,
    SEED_RANGE,
    STAGES,
    TASKS,
    TEXT2MUSIC,
    GenerationParams,
    ParameterError,
    source_field,
)
from gateway.formats import BITRATE_MODES, FORMAT_NAMES, Encoding, choose_encoding

DEPLOY_FIELDS = ("checkpoint_path", "bf16", "torch_compile", "device_id")
ENCODING_FIELDS = ("format", "bit_depth", "compression_level", "quality", "bitrate_mode")
# The tasks `task` names (upstream's choices): audio2audio is chosen by audio2audio_enable instead.
REQUEST_TASKS = tuple(task for task in TASKS if task != AUDIO2AUDIO)
# The request field naming each audio-input task's audio: an upload's or an earlier output's name.
SOURCE_FIELDS = {task: source_field(task) for task in AUDIO_INPUT_TASKS}
# Fields the gateway reads itself: they never reach GenerationParams.
GATEWAY_FIELDS = ("src_audio_path", "ref_audio_input", "audio2audio_enable")
_DEFAULTS = GenerationParams(prompt="", lyrics="")
_UNIT = {"minimum": 0.0, "maximum": 1.0}
_SEEDS = {"maxItems": MAX_SEEDS, "items": {"type": "integer", "minimum": 0, "maximum": SEED_RANGE - 1}}
_SECONDS = {"minimum": -MAX_DURATION_S, "maximum": MAX_DURATION_S}


class GenerateRequest(BaseModel):
    """Body of POST /generate (seed README, 'Request Parameters')."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "checkpoint_path": "/workspace/ace-step-api/checkpoints/ACE-Step-v1-3.5B",
                    "audio_duration": 60.0,
                    "prompt": "pop, rock, electronic, upbeat, energetic",
                    "lyrics": "[verse]\nWalking through the city streets at night\nLights are shining bright\n\n"
                    "[chorus]\nThis is our time to shine\nTogether we'll make it fine",
                    "infer_step": 60,
                    "guidance_scale": 15.0,
                    "scheduler_type": "euler",
                    "cfg_type": "apg",
                    "omega_scale": 10.0,
                    "actual_seeds": [1234567890],
                    "guidance_interval": 0.5,
                    "guidance_interval_decay": 0.0,
                    "min_guidance_scale": 3.0,
                    "use_erg_tag": True,
                    "use_erg_lyric": True,
                    "use_erg_diffusion": True,
                    "oss_steps": [],
                }
            ]
        },
    )

    checkpoint_path: str = Field(
        description="Path to the model checkpoint directory. Must equal the checkpoint this deployment serves; "
        "any other answers 400 naming the served one (a deployment serves one checkpoint)."
    )
    audio_duration: float = Field(description="Duration in seconds, in (0, 240]; -1 picks a random 30-240 s.")
    prompt: str = Field(description="Music style/genre description (comma-separated tags).")
    lyrics: str = Field(description="Lyrics with structure tags ([verse], [chorus], ...); may be empty.")
    infer_step: int = Field(description="Number of diffusion steps (typical 27-100; 60 is common).")
    guidance_scale: float = Field(description="How strongly to follow prompt and lyrics (typical 10-20, 15.0).")
    scheduler_type: str = Field(
        description=f"One of {', '.join(SCHEDULERS)}: euler is fast, heun slower and possibly better, "
        "pingpong uses an SDE step for consistency."
    )
    cfg_type: str = Field(
        description=f"One of {', '.join(CFG_TYPES)}: apg (adaptive projected guidance with momentum, "
        "recommended), cfg (classifier-free guidance), cfg_star (CFG variant)."
    )
    omega_scale: float = Field(description="Flow-matching granularity parameter (default 10.0).")
    actual_seeds: list[int] = Field(
        description="Random seeds in [0, 2**32). One audio item is generated per seed; an empty list draws one "
        "random seed. The response body is the first item; every item is written to the outputs directory "
        "(see the X-Output-Files and X-Actual-Seeds headers)."
    )
    guidance_interval: float = Field(
        description="Fraction of steps with active guidance, centred (0.5: middle 50%, 1.0: all steps)."
    )
    guidance_interval_decay: float = Field(description="Guidance decay over the interval (0.0 = constant).")
    min_guidance_scale: float = Field(description="Guidance scale the decay ends at.")
    use_erg_tag: bool = Field(description="Entropy rectifying guidance on the text (tag) condition.")
    use_erg_lyric: bool = Field(description="Entropy rectifying guidance on the lyric condition.")
    use_erg_diffusion: bool = Field(description="Entropy rectifying guidance in the diffusion transformer.")
    oss_steps: list[int] = Field(
        description="Optimised step sampling: the 1-based steps to run (empty = all infer_step steps)."
    )
    bf16: bool | None = Field(
        default=None,
        description="bfloat16 precision. A deploy-time choice: must equal the deployment's precision "
        "(400 otherwise); omitted means the deployment's (the contract's default true on GPU deployments).",
    )
    torch_compile: bool | None = Field(
        default=None,
        description="torch.compile. A deploy-time choice: must equal the deployment's (default false).",
    )
    device_id: int | None = Field(
        default=None,
        description="GPU device id. A deploy-time choice: must equal the deployment's (default 0).",
    )
    output_path: str | None = Field(
        default=None,
        description="File name for the audio inside the outputs directory, ending in the format's suffix "
        "(.wav, .flac, .ogg, .opus, .mp3; letters, digits, '.', '_', '-'); auto-generated (output_<hex>.<suffix>) "
        "when null. An existing file of that name is replaced.",
    )
    format: str = Field(
        default="wav",
        description="Audio file format: wav (default), flac, ogg (Vorbis), opus (Opus in Ogg) or mp3.",
        json_schema_extra={"enum": list(FORMAT_NAMES)},
    )
    bit_depth: int | None = Field(
        default=None,
        description="wav: 16, 24 (PCM) or 32 (float, the default); flac: 16 or 24 (default). Other formats: omit.",
    )
    compression_level: int | None = Field(
        default=None,
        description="flac only: FLAC compression level 0 (fastest) to 8 (smallest); lossless either way. "
        "Omitted: libsndfile's default.",
    )
    quality: float | None = Field(
        default=None,
        description="ogg, opus, mp3 only: 0 (smallest) to 1 (best); mp3 needs > 0. With mp3's constant "
        "bitrate_mode it picks the bitrate (1.0: 320 kbit/s). Omitted: 0.5.",
    )
    bitrate_mode: str | None = Field(
        default=None,
        description="mp3 only: constant, average or variable (the default).",
        json_schema_extra={"enum": list(BITRATE_MODES)},
    )
    guidance_scale_text: float = Field(default=0.0, description="Separate text guidance (0.0 = disabled).")
    guidance_scale_lyric: float = Field(default=0.0, description="Separate lyric guidance (0.0 = disabled).")
    # The other tasks (upstream's names and defaults). A mode field the task does not use, set away
    # from its default, is a 400 naming it (the task table in gateway/README.md).
    task: str = Field(
        default=_DEFAULTS.task,
        description="text2music (default), retake (a variation of a text2music result), repaint (regenerate "
        "a window of src_audio_path), extend (add audio before and/or after src_audio_path) or edit (change "
        "src_audio_path's prompt and lyrics, keeping its melody). audio2audio: set audio2audio_enable instead.",
        json_schema_extra={"enum": list(REQUEST_TASKS)},
    )
    retake_seeds: list[int] = Field(
        default=[],  # pydantic copies it for each request
        description="retake, repaint, extend, edit: seeds of the retake noise (edit draws all its noise from "
        "them), paired with actual_seeds item by item as upstream does: item i takes retake_seeds[i], the "
        "last one past the list's end; an empty list draws them. The seeds used come back in X-Retake-Seeds.",
        json_schema_extra=_SEEDS,
    )
    retake_variance: float = Field(
        default=_DEFAULTS.retake_variance,
        description="retake, repaint: how far the start noise moves towards the retake noise (0: none, 1: all); "
        "repaint, extend: also the steps skipped, int(infer_step * (1 - retake_variance)).",
        json_schema_extra=_UNIT,
    )
    repaint_start: float = Field(
        default=_DEFAULTS.repaint_start,
        description="repaint: where the window to regenerate starts, seconds into the source (>= 0). "
        "extend: negative to add that many seconds before the source.",
        json_schema_extra=_SECONDS,
    )
    repaint_end: float = Field(
        default=_DEFAULTS.repaint_end,
        description="repaint: where the window ends (above repaint_start, inside the source). extend: past the "
        "source's end to add audio after it.",
        json_schema_extra=_SECONDS,
    )
    src_audio_path: str | None = Field(
        default=None,
        description="repaint, extend, edit (required there, refused elsewhere): the source audio, as the name "
        "of an upload (POST /uploads) or of an earlier output file; never a server path.",
    )
    edit_target_prompt: str = Field(
        default=_DEFAULTS.edit_target_prompt,
        description="edit: the prompt to edit towards (`prompt` describes the source).",
    )
    edit_target_lyrics: str = Field(
        default=_DEFAULTS.edit_target_lyrics,
        description="edit: the lyrics to edit towards (`lyrics` are the source's).",
    )
    edit_n_min: float = Field(
        default=_DEFAULTS.edit_n_min,
        description="edit: fraction of the steps skipped before editing starts (at most edit_n_max).",
        json_schema_extra=_UNIT,
    )
    edit_n_max: float = Field(
        default=_DEFAULTS.edit_n_max,
        description="edit: fraction of the steps after which only the target condition is followed.",
        json_schema_extra=_UNIT,
    )
    edit_n_avg: int = Field(
        default=_DEFAULTS.edit_n_avg,
        description="edit: velocity estimates averaged per editing step.",
        json_schema_extra={"minimum": 1, "maximum": MAX_EDIT_N_AVG},
    )
    audio2audio_enable: bool = Field(
        default=False,
        description="audio2audio: generate from ref_audio_input towards prompt and lyrics. Needs "
        "ref_audio_input and task left at text2music (upstream would silently replace any task).",
    )
    ref_audio_input: str | None = Field(
        default=None,
        description="audio2audio (required with audio2audio_enable, refused without): the reference audio, as "
        "the name of an upload or of an earlier output file; never a server path.",
    )
    ref_audio_strength: float = Field(
        default=_DEFAULTS.ref_audio_strength,
        description="audio2audio: how much of the reference is kept (1: all of it; the loop runs "
        "int((1 - ref_audio_strength) * infer_step) steps).",
        json_schema_extra=_UNIT,
    )
    lora_name_or_path: str = Field(
        default=_DEFAULTS.lora_name_or_path,
        description=f"A LoRA adapter by name, as the deployment provides them; {NO_LORA!r} is the base model. "
        "Never a server path.",
        json_schema_extra={"maxLength": MAX_ADAPTER_NAME_CHARS},
    )
    lora_weight: float = Field(
        default=_DEFAULTS.lora_weight,
        description="Scale of the adapter's contribution.",
        json_schema_extra=_UNIT,
    )

    def generation_params(self) -> GenerationParams:
        """The run-time parameters, validated by the contract (raises ParameterError naming the field);
        audio2audio_enable becomes the task audio2audio."""
        if self.task not in REQUEST_TASKS:
            raise ParameterError("task", f"must be one of {list(REQUEST_TASKS)}, got {self.task!r} "
                                         "(audio2audio: audio2audio_enable with ref_audio_input)")
        fields = self.model_dump(exclude={*DEPLOY_FIELDS, *ENCODING_FIELDS, *GATEWAY_FIELDS, "output_path"})
        if self.audio2audio_enable:
            if self.task != TEXT2MUSIC:
                raise ParameterError("audio2audio_enable", f"chooses the task audio2audio: leave task out, "
                                                         f"got {self.task!r}")
            fields["task"] = AUDIO2AUDIO
        return GenerationParams(**fields)

    def source(self, task: str) -> tuple[str, str] | None:
        """(field, name) of the audio `task` starts from, or None for a task without one. ParameterError
        naming the field when the task's audio is missing, or audio is given to a task that does not read it."""
        wanted = SOURCE_FIELDS.get(task)
        for field in ("src_audio_path", "ref_audio_input"):
            given = getattr(self, field)
            if field == wanted and given is None:
                raise ParameterError(field, f"task {task!r} needs it: the name of an upload or of an earlier output")
            if field != wanted and given is not None:
                hint = " (set audio2audio_enable)" if field == "ref_audio_input" else ""
                raise ParameterError(field, f"is not used by task {task!r}{hint}")
        return None if wanted is None else (wanted, getattr(self, wanted))

    def encoding(self) -> Encoding:
        """The output format and its options, checked (raises ParameterError naming the field)."""
        return choose_encoding(**self.model_dump(include=set(ENCODING_FIELDS)))


class JobLinks(BaseModel):
    self: str = Field(description="GET: this job.")
    events: str = Field(description="GET: its server-sent events.")
    cancel: str = Field(description="DELETE: cancel it.")
    downloads: list[str] = Field(description="GET: each written audio file, in item order (empty until it succeeded).")


class JobView(BaseModel):
    """A job as GET /jobs/{id} and every event of its stream show it."""

    id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled.")
    stage: str = Field(
        description="queued, generating (the engine reports no finer stage), " + ", ".join(STAGES)
        + ", writing, or done."
    )
    step: int = Field(description="Diffusion steps done (of `steps`).")
    steps: int = Field(description="Diffusion steps the request runs.")
    progress: float = Field(description="0 to 1, never decreasing, except when an outage cut the generation off: "
                            "the job is queued again and starts over once Triton has recovered.")
    queue_position: int = Field(description="1 for the next job to start; 0 when not queued.")
    eta_s: float | None = Field(description="Seconds until it should finish, from measured rates; null before any.")
    created_at: float = Field(description="Unix time of submission.")
    started_at: float | None
    finished_at: float | None
    timings: dict[str, Any] = Field(description="Seconds, as the /generate headers and sidecar give them.")
    files: list[str] = Field(description="Audio files written, in item order (each has a _input_params.json sidecar).")
    seeds: list[int] = Field(description="The seed of each item.")
    retake_seeds: list[int] = Field(description="The retake seed of each item, for the tasks that read them "
                                    "(retake, repaint, extend, edit); empty otherwise.")
    error: str | None = Field(description="Why it failed or was cancelled.")
    request_id: str | None = Field(description="The X-Request-ID of the request that submitted it.")
    links: JobLinks

    @classmethod
    def of(cls, job: Any) -> JobView:
        return cls(
            id=job.id,
            state=str(job.state),
            stage=job.stage,
            step=job.step,
            steps=job.steps,
            progress=job.progress,
            queue_position=job.queue_position,
            eta_s=job.eta_s,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            timings=job.timings,
            files=list(job.files),
            seeds=list(job.seeds),
            retake_seeds=list(job.retake_seeds),
            error=job.error,
            request_id=job.request_id,
            links=JobLinks(
                self=f"/jobs/{job.id}",
                events=f"/jobs/{job.id}/events",
                cancel=f"/jobs/{job.id}",
                downloads=[f"/download/{name}" for name in job.files],
            ),
        )


class JobPage(BaseModel):
    jobs: list[JobView] = Field(description="Newest first.")
    next: str | None = Field(description="The next page's URL; null on the last page.")


class UploadView(BaseModel):
    """An uploaded audio file, as POST /uploads and GET /uploads describe it."""

    name: str = Field(description="What src_audio_path or ref_audio_input take to use it.")
    format: str = Field(description="libsndfile's name of the container (WAV, FLAC, OGG, MP3, ...).")
    sample_rate: int = Field(description="Samples per second, as stored (the encoder resamples).")
    channels: int = Field(description="1 or 2.")
    duration: float = Field(description="Seconds of audio.")
    size: int = Field(description="Bytes.")
    modified_at: float = Field(description="Unix time it was stored; retention counts its age from here.")


class UploadList(BaseModel):
    uploads: list[UploadView] = Field(description="Newest first.")


class ErrorBody(BaseModel):
    """Every error answer."""

    detail: str = Field(description="What went wrong; names the offending field for 400s.")


class HealthBody(BaseModel):
    status: str = Field(description='"healthy"', examples=["healthy"])


class UnhealthyBody(ErrorBody):
    status: str = Field(description='"unhealthy"', examples=["unhealthy"])
    models: dict[str, str] = Field(default_factory=dict, description="Each model that cannot serve, and why "
                                   "(Triton's state and reason, or the probe it failed).")


class LiveBody(BaseModel):
    status: str = Field(description='"alive"', examples=["alive"])


def _header(description: str, kind: str = "number") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


GENERATE_HEADERS = {
    "X-Output-Path": _header("Absolute path of the written audio file (the body's item).", "string"),
    "X-Generation-Time": _header("Total seconds the gateway spent on the request, end to end."),
    "X-Init-Time": _header(
        "Seconds spent getting the pipeline ready for this request: building a Triton client "
        "(0 when one is reused; the model itself is loaded once when Triton starts)."
    ),
    "X-Prep-Time": _header(
        "Seconds spent preparing parameters: the gateway's validation and tensor building plus "
        "Triton's preprocess stage (tokenization, seeds)."
    ),
    "X-Generation-Time-Detailed": _header(
        "Seconds of audio generation inside Triton: the sum of the "
        + ", ".join(s for s in STAGES if s != "preprocess")
        + " stages."
    ),
    "Server-Timing": _header(
        "The same times per stage in milliseconds (W3C Server-Timing): init, prep, "
        + ", ".join(STAGES)
        + ", triton (round trip), write, total.",
        "string",
    ),
    "X-Actual-Seeds": _header("Comma-separated seeds used, one per item, in item order.", "string"),
    "X-Retake-Seeds": _header(
        "Comma-separated retake seeds used, one per item, in item order; only for the tasks that read "
        "retake_seeds (retake, repaint, extend, edit).",
        "string",
    ),
    "X-Output-Files": _header(
        "Comma-separated file names of every item written (each downloadable from /download/{filename}); "
        "each has a JSON sidecar <stem>_input_params.json with the request, seeds and timings.",
        "string",
    ),
    "X-Job-Id": _header("The job this request ran as (GET /jobs/{id} and its events work for it too).", "string"),
    "X-Audio-Duration": _header(
        "Seconds of audio in the file (the requested duration, or the random one for -1, "
        "rounded to the model's latent frame)."
    ),
}

JOB_HEADERS = {
    "Location": _header("The job's URL.", "string"),
    "X-Job-Id": _header("The job's id.", "string"),
    "Idempotent-Replayed": _header("true when an earlier request with this Idempotency-Key made the job.", "string"),
}
IDEMPOTENCY_HELP = (
    "Any string up to 200 characters: a retry with the same key returns the job the first request made "
    "(no second generation), for as long as the job is kept."
)

DOWNLOAD_HEADERS = {
    "X-Download-Time": _header("Seconds spent locating the file."),
    "X-File-Path": _header("Absolute path of the file served.", "string"),
}
