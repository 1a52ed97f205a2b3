"""Jobs: every generation (POST /jobs and POST /generate alike) is a job run by one JobManager.

The manager holds the bound on queued plus running generations (429 past it), runs at most
`max_running_jobs` at a time against the engine (the rest wait here, in submission order, so their
queue position and ETA are known and cancelling them costs Triton nothing), applies the deadline,
cancels, writes the files, and records every change in the JobStore, whose numbered events feed
GET /jobs/{id}/events.

Cancellation: cancelling a job cancels the asyncio task awaiting the engine; with the gRPC engine
that cancels the RPC and Triton sees the request cancelled. Files are written only after the
engine's answer, as one shielded step; a cancel arriving during it removes what was written, so a
cancelled job never leaves files.

Source audio (repaint, extend, edit, audio2audio) is checked at submission and stored in the job by
name; it is decoded when the job starts running, so a queued job holds no samples, and a source
removed meanwhile fails the job with that reason.

Outages (gateway.health): a job starts only while the engine is ready, so queued jobs wait through
a Triton restart or a model reload. A generation that fails while the engine turns out not ready
(HealthMonitor.outage) was cut off by the outage: it goes back to the queue and runs once more after the recovery.
/generate requests arriving during an outage are refused at once (503, Retry-After); jobs are
queued.

Shutdown (`drain`): no new work (503), nothing more starts, running generations get up to the
shutdown deadline to finish and write their files; queued jobs stay queued in the store.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from acestep_triton.contract import (
    ENSEMBLE_NAME,
    OUTPUT_SAMPLE_RATE,
    TASK_FIELDS,
    TASK_INPUTS,
    GenerationResult,
    ParameterError,
    SourceAudio,
    validate_source,
)
from gateway.audio_stream import AudioStream
from gateway.engine import GenerationEngine, Progress
from gateway.errors import (
    INTERNAL_ERROR_DETAIL,
    Busy,
    DeadlineExceeded,
    EngineFailed,
    EngineRejected,
    EngineUnavailable,
    JobConflict,
    JobNotFound,
    NotReady,
    ShuttingDown,
    StorageFull,
    status_of,
)
from gateway.formats import Encoding
from gateway.health import HealthMonitor
from gateway.jobstore import Job, JobEvent, JobState, JobStore
from gateway.outputs import OutputStore
from gateway.request_ids import current as current_request_id
from gateway.schema import SOURCE_FIELDS, GenerateRequest
from gateway.settings import Settings
from gateway.uploads import SourceFiles

log = logging.getLogger("gateway")

# Where each stage starts on the 0-1 progress scale (diffusion spreads its steps up to dcae_decoder's
# start); weights follow measured CPU stage times of short requests, the loop dominating.
STAGE_START = {
    "queued": 0.0,
    "generating": 0.0,
    "preprocess": 0.0,
    "text_encoder": 0.02,
    "condition_encoder": 0.04,
    "diffusion": 0.06,
    "dcae_decoder": 0.86,
    "vocoder": 0.92,
    "writing": 0.98,
}
RESTART_REASON = "the gateway restarted while this job was running"
CANCEL_REASON = "cancelled by a client"
DISCONNECT_REASON = "the /generate client disconnected"
SOURCE_NAME_FIELDS = frozenset(SOURCE_FIELDS.values())
# The ensemble inputs that carry a request's source audio (contract.TASK_INPUTS without a parameter).
SOURCE_INPUTS = frozenset(spec.name for spec in TASK_INPUTS if not spec.param)


def progress_of(stage: str, step: int = 0, steps: int = 0) -> float:
    """0-1 progress at a stage (and step of steps inside diffusion)."""
    if stage == "diffusion" and steps:
        span = STAGE_START["dcae_decoder"] - STAGE_START["diffusion"]
        return round(STAGE_START["diffusion"] + span * step / steps, 6)  # the last step lands on 0.86 exactly
    return STAGE_START[stage]


class RateMeter:
    """Measured speed: exponentially weighted seconds per diffusion step and per job outside the loop.

    Jobs whose steps were not observed (an engine without progress) count wholly as steps, so the
    estimate still scales with infer_step.
    """

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.step_s: float | None = None
        self.other_s = 0.0

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record(self, steps: int, loop_s: float | None, total_s: float) -> None:
        if loop_s is None:
            self.step_s = self._mix(self.step_s, total_s / max(steps, 1))
        else:
            self.step_s = self._mix(self.step_s, loop_s / max(steps, 1))
            self.other_s = self._mix(self.other_s, max(total_s - loop_s, 0.0))

    def job_s(self, steps: int) -> float | None:
        return None if self.step_s is None else self.step_s * steps + self.other_s


@dataclass
class _Live:
    """What the manager keeps in memory for a pending job of this process."""

    job: Job  # its latest state
    synchronous: bool = False  # a /generate job: its client waits for the answer
    audio: AudioStream | None = None  # its audio as decoded, when the job streams it
    task: asyncio.Task | None = None
    loop_started: float | None = None  # monotonic time the first diffusion step was seen
    interrupted_by: tuple[JobState, Exception] | None = None  # the outcome recorded when its task is cancelled


class JobManager:
    """Runs jobs for one gateway process (see the module docstring)."""

    def __init__(self, settings: Settings, engine: GenerationEngine, outputs: OutputStore, store: JobStore,
                 sources: SourceFiles, health: HealthMonitor) -> None:
        self.settings = settings
        self.engine = engine
        self.outputs = outputs
        self.store = store
        self.sources = sources
        self.health = health
        self.rate = RateMeter()
        self._live: dict[str, _Live] = {}  # pending jobs of this process, in submission order
        self._changed: dict[str, asyncio.Event] = {}
        self._slots: asyncio.Semaphore | None = None
        self._stopping = False
        self.draining = False  # shutdown began: no new work, nothing more starts
        self._drained = False  # shutdown's drain is over: event streams end
        self.writing: set[str] = set()  # file names being written now (retention leaves them alone)
        self.reading: set[str] = set()  # source audio being decoded now (the same)

    # ---- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take over the store: jobs that were running are failed (their process is gone), queued ones
        run again in their original order; the temporary files of writes the old process did not finish
        are removed (no final name ever pointed at them)."""
        self._slots = asyncio.Semaphore(self.settings.max_running_jobs)
        removed = self.outputs.remove_partial_writes()
        if removed:
            log.warning("removed %d unfinished writes of an earlier gateway process: %s", len(removed), removed)
        for job in self.store.pending():
            if job.state is JobState.RUNNING:
                self._save(job.evolve(state=JobState.FAILED, finished_at=time.time(), error=RESTART_REASON,
                                      error_status=status_of(EngineFailed(RESTART_REASON))))
            else:
                self._schedule(job)

    async def stop(self) -> None:
        """Stop running jobs without recording an outcome: the next start() settles them."""
        self._stopping = True
        tasks = [live.task for live in self._live.values() if live.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, deadline_s: float) -> None:
        """Shutdown's first step (module docstring): queued /generate jobs fail at once (their clients get
        503), running generations get `deadline_s` to finish, those still running then fail; queued
        jobs stay queued. Event streams end afterwards (clients resume them with Last-Event-ID)."""
        self.draining = True
        for live in list(self._live.values()):
            if live.synchronous and live.job.state is JobState.QUEUED:
                self._interrupt(live, JobState.FAILED, ShuttingDown(
                    "the gateway is shutting down; this request did not start, retry it", 1))
        running = [live.task for live in self._live.values() if live.job.state is JobState.RUNNING and live.task]
        if running:
            log.warning("shutting down: waiting up to %g s for %d running generations", deadline_s, len(running))
            await asyncio.wait(running, timeout=deadline_s)
        late = [live for live in self._live.values() if live.job.state is JobState.RUNNING]
        for live in late:
            self._interrupt(live, JobState.FAILED, ShuttingDown(
                f"the gateway shut down before this generation finished (shutdown deadline {deadline_s:g} s)", 1))
        await asyncio.gather(*(live.task for live in late if live.task), return_exceptions=True)
        self._drained = True
        for job_id in list(self._changed):
            self._wake(job_id)

    # ---- submit, look up, cancel ----------------------------------------------------------------------

    def submit(self, request: GenerateRequest, idempotency_key: str | None = None, synchronous: bool = False,
               request_id: str | None = None) -> tuple[Job, bool]:
        """Validate and queue a request; (job, created). The same idempotency key returns the same job.
        `synchronous`: a /generate request, whose client waits (refused while the engine is not ready).
        A job that is not synchronous decodes its audio in chunks that GET /jobs/{id}/audio can send as
        they come (a WAV job, an engine that streams).

        Raises ParameterError (400) for a bad request, Busy (429) past the bound, NotReady (503) for a
        synchronous request during an outage and ShuttingDown (503) once shutdown began.
        """
        if self.draining:
            raise ShuttingDown("the gateway is shutting down; retry on another instance or after its restart",
                               max(1, math.ceil(self.settings.shutdown_deadline_s)))
        if idempotency_key is not None:
            existing = self.store.find(idempotency_key)
            if existing is not None:
                return existing, False
        check_start = time.perf_counter()
        served = check_request(request, self.settings, self.outputs, self.sources)
        check_s = time.perf_counter() - check_start
        if len(self._live) >= self.settings.max_pending_jobs:
            raise Busy(
                f"{len(self._live)} generations are queued or running (the limit is "
                f"{self.settings.max_pending_jobs}); retry later",
                self.retry_after_s(),
            )
        if synchronous and not self.health.ready:
            raise NotReady(f"not ready to generate: {self.health.readiness.detail}", self.health.retry_after_s())
        job = Job(
            id=uuid.uuid4().hex,
            state=JobState.QUEUED,
            request=served,
            output_name=served["output_path"],
            created_at=time.time(),
            idempotency_key=idempotency_key,
            steps=request.infer_step if not request.oss_steps else len(request.oss_steps),
            timings={"check": check_s},
            queue_position=sum(live.job.state is JobState.QUEUED for live in self._live.values()) + 1,
            request_id=request_id,
        )
        job, created = self.store.create(self.estimated(job))
        if created:
            self._schedule(job, synchronous)
        return job, created

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"job_id: no job {job_id!r}")
        return job

    def cancel(self, job_id: str, reason: str = CANCEL_REASON) -> Job:
        """Cancel a queued or running job (its Triton request too); JobConflict when it has finished."""
        job = self.get(job_id)
        live = self._live.get(job_id)
        if job.state.finished or live is None or live.task is None:
            raise JobConflict(f"job {job_id} has already finished: {job.state}")
        self._interrupt(live, JobState.CANCELLED, JobConflict(reason))
        return job

    @staticmethod
    def _interrupt(live: _Live, state: JobState, error: Exception) -> None:
        """Cancel a job's task; it ends in `state` with `error` (for its /generate answer)."""
        live.interrupted_by = (state, error)
        if live.task is not None:
            live.task.cancel()

    async def wait(self, job_id: str) -> Job:
        """The job once it has finished."""
        while True:
            job = self.get(job_id)
            if job.state.finished:
                return job
            await self._event(job_id).wait()  # no await since the read: no change can slip between

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events numbered above `after`, live, ending with its final state (FastAPI's event
        stream sends keep-alive comments while nothing happens)."""
        self.get(job_id)
        while True:
            events = self.store.events_after(job_id, after)
            for event in events:
                yield event
                after = event.seq
                if event.job.state.finished:
                    return
            if events:
                continue
            if self.get(job_id).state.finished or self._drained:
                return  # the final event was delivered before (Last-Event-ID at or past it), or shutting down
            await self._event(job_id).wait()  # no await since the read: no change can slip between

    # ---- views ----------------------------------------------------------------------------------------

    def estimated(self, job: Job) -> Job:
        """The job with its queue position and ETA as of now."""
        return job.evolve(queue_position=self.queue_position(job), eta_s=self.eta_s(job))

    def queue_position(self, job: Job) -> int:
        """1 for the next job to start, 0 when it is not queued (here)."""
        if job.state is not JobState.QUEUED:
            return 0
        queued = [jid for jid, live in self._live.items() if live.job.state is JobState.QUEUED]
        return queued.index(job.id) + 1 if job.id in queued else job.queue_position

    def eta_s(self, job: Job) -> float | None:
        """Seconds until the job should finish, from the measured rates; None before any measurement."""
        if job.state.finished:
            return 0.0
        expected = self.rate.job_s(job.steps)
        if expected is None:
            return None
        if job.state is JobState.RUNNING:
            live = self._live.get(job.id)
            if live is not None and live.loop_started is not None and job.step > 0 and job.stage == "diffusion":
                per_step = (time.monotonic() - live.loop_started) / job.step
                return per_step * (job.steps - job.step) + self.rate.other_s
            return max(expected - (time.time() - (job.started_at or time.time())), 0.0)
        ahead = max(self.queue_position(job) - 1, 0)
        running = [live.job for live in self._live.values() if live.job.state is JobState.RUNNING]
        busy_s = sum(self.eta_s(j) or 0.0 for j in running)
        return (busy_s + ahead * expected) / self.settings.max_running_jobs + expected

    def retry_after_s(self) -> int:
        """Whole seconds until a pending slot should free up: the soonest pending job's ETA (1 before any
        measurement)."""
        known = [eta for live in self._live.values() if (eta := self.eta_s(live.job)) is not None]
        return max(1, math.ceil(min(known))) if known else 1

    # ---- running --------------------------------------------------------------------------------------

    def _event(self, job_id: str) -> asyncio.Event:
        """The event set at the job's next change (one per job, replaced after each change)."""
        if job_id not in self._changed:
            self._changed[job_id] = asyncio.Event()
        return self._changed[job_id]

    def _save(self, job: Job) -> Job:
        """Record a change (with the position and ETA it implies) and wake whoever waits on the job.
        A job leaving the queue moves the ones behind it up: each gets an event with its new position."""
        left_queue = job.id in self._live and self._live[job.id].job.state is JobState.QUEUED
        left_queue = left_queue and job.state is not JobState.QUEUED
        if job.id in self._live:
            self._live[job.id].job = job
        job = self.estimated(job)
        self.store.save(job)
        if job.id in self._live:
            self._live[job.id].job = job
        self._wake(job.id)
        if left_queue:
            for live in list(self._live.values()):
                if live.job.state is JobState.QUEUED and self.queue_position(live.job) != live.job.queue_position:
                    self._save(live.job)
        return job

    def _wake(self, job_id: str) -> None:
        changed = self._changed.pop(job_id, None)
        if changed is not None:
            changed.set()

    def audio_stream(self, job_id: str) -> AudioStream | None:
        """The running or queued job's audio stream; None when it has none (not streaming, or over)."""
        live = self._live.get(job_id)
        return None if live is None else live.audio

    def _schedule(self, job: Job, synchronous: bool = False) -> None:
        encoding = GenerateRequest.model_validate(job.request).encoding()
        streams = not synchronous and self.settings.stream_job_audio and encoding.format.name == "wav"
        live = _Live(job, synchronous, AudioStream(encoding, OUTPUT_SAMPLE_RATE) if streams else None)
        self._live[job.id] = live
        live.task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")

    async def _admitted(self) -> None:
        """Returns when a job may start: the engine ready, shutdown not begun (then never: stop() cancels)."""
        while self.draining or not self.health.ready:
            if self.draining:
                await asyncio.get_running_loop().create_future()
            await self.health.wait_ready()

    async def _generate(self, live: _Live, params, source: SourceAudio | None) -> tuple[GenerationResult, float]:
        """The engine's answer for the job, and the seconds it took. A generation cut off by an outage (it
        failed and HealthMonitor.outage finds one) goes back to the queue and runs once more, unless it
        had streamed audio already (a reader holds those bytes)."""
        retried = False
        while True:
            await self._admitted()
            job = self._save(live.job.evolve(state=JobState.RUNNING, started_at=live.job.started_at or time.time(),
                                             stage="generating", step=0, progress=0.0))
            live.loop_started = None
            start = time.perf_counter()
            try:
                result = await self.engine.generate(params, lambda p: self._progress(live, p), source,
                                                    stream_audio=live.audio is not None,
                                                    request_id=job.request_id or "")
                return result, time.perf_counter() - start
            except (EngineFailed, EngineUnavailable) as exc:
                if retried or (live.audio is not None and live.audio.samples_done) or not await self.health.outage():
                    raise
                retried = True
                log.warning("job %s was cut off by an outage (%r); it waits for the recovery and runs again",
                            job.id, exc)
                self._save(live.job.evolve(state=JobState.QUEUED, stage="queued", step=0, progress=0.0))

    def _progress(self, live: _Live, p: Progress) -> None:
        job = live.job
        if p.stage == "diffusion" and live.loop_started is None:
            live.loop_started = time.monotonic()
        if p.audio is not None:
            live.audio.feed(p.audio, p.audio_offset, p.audio_samples)
        self._save(job.evolve(stage=p.stage, step=p.step, steps=p.steps or job.steps,
                              progress=progress_of(p.stage, p.step, p.steps)))

    async def _run(self, job: Job) -> None:
        live = self._live[job.id]
        current_request_id.set(job.request_id or "-")  # this task's log lines carry the job's request id
        request = GenerateRequest.model_validate(job.request)
        params, encoding = request.generation_params(), request.encoding()
        source_ref = request.source(params.task)
        start_wall, start = time.time(), time.perf_counter()
        remaining = job.created_at + self.settings.job_deadline_s - start_wall
        try:
            async with asyncio.timeout(remaining):
                async with self._slots:
                    source_start = time.perf_counter()
                    source = None if source_ref is None else await self._read_source(*source_ref)
                    live.job = live.job.evolve(timings=live.job.timings | {"source": time.perf_counter() - source_start})
                    try:
                        result, triton_s = await self._generate(live, params, source)
                    except (ParameterError, EngineRejected) as exc:
                        raise in_request_terms(exc, source_ref) from None
            job = self._save(live.job.evolve(stage="writing", progress=progress_of("writing"),
                                             retake_seeds=retake_seeds_of(params.task, result)))
            names = self.outputs.item_names(job.output_name, len(result.seeds))
            self.writing.update(names)
            write = asyncio.ensure_future(asyncio.to_thread(self._write, job, names, result, encoding,
                                                            start_wall - job.created_at, triton_s, start))
            try:
                timings = await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait([write])  # let the write finish, then take it back
                self._remove(names)
                raise
            except Exception:
                self._remove(names)  # a failed write keeps none of the job's items
                raise
            finally:
                self.writing.difference_update(names)
            loop_s = None if live.loop_started is None else result.timings.get("diffusion")
            self.rate.record(job.steps, loop_s, triton_s)
            self._save(job.evolve(state=JobState.SUCCEEDED, finished_at=time.time(), stage="done", progress=1.0,
                                  step=job.steps, files=tuple(names), seeds=result.seeds, timings=timings))
        except asyncio.CancelledError:
            if self._stopping:
                raise
            self._finish(live.job, *(live.interrupted_by or (JobState.CANCELLED, JobConflict(CANCEL_REASON))))
        except TimeoutError:
            self._finish(live.job, JobState.FAILED, DeadlineExceeded(
                f"deadline exceeded: the job did not finish within {self.settings.job_deadline_s:g} s of its submission"
            ))
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._finish(live.job, JobState.FAILED, StorageFull(
                "the outputs directory is full (no space left on device); nothing was written") if full else exc)
        except Exception as exc:
            self._finish(live.job, JobState.FAILED, exc)
        finally:
            self._live.pop(job.id, None)
            if live.audio is not None:
                live.audio.close()

    async def _read_source(self, field: str, name: str) -> SourceAudio:
        """Decode the job's source audio in a worker thread (retention leaves it alone meanwhile)."""
        self.reading.add(name)
        try:
            return await asyncio.to_thread(self.sources.read, field, name)
        finally:
            self.reading.discard(name)

    def _finish(self, job: Job, state: JobState, exc: Exception) -> None:
        """Record a job's end by `exc`: the status /generate answers comes from the one error table, the
        text is the exception's (a fixed one for 500s, whose cause goes to the log)."""
        status = status_of(exc)
        if status == 500:
            log.error("job %s failed: %r", job.id, exc, exc_info=exc)
        self._save(job.evolve(state=state, finished_at=time.time(), error_status=status,
                              error=INTERNAL_ERROR_DETAIL if status == 500 else str(exc)))

    def _write(self, job: Job, names: list[str], result: GenerationResult, encoding: Encoding, queued_s: float,
               triton_s: float, start: float) -> dict[str, Any]:
        """Write every item and its sidecar atomically (in a worker thread); the job's timings."""
        write_start = time.perf_counter()
        for index, name in enumerate(names):
            self.outputs.write_bytes(name, encoding.encode(result.waveforms[index], OUTPUT_SAMPLE_RATE))
        write_s = time.perf_counter() - write_start
        timings = _timings(result, job.timings["check"], job.timings["source"], queued_s, triton_s, write_s,
                           time.perf_counter() - start + queued_s)
        paths = [str(self.outputs.root / n) for n in names]
        for index, name in enumerate(names):
            self.outputs.write_json(self.outputs.sidecar_name(name), {
                "job_id": job.id,
                "request_id": job.request_id,
                "request": job.request,
                "item": index,
                "seed": result.seeds[index],
                "actual_seeds": list(result.seeds),
                "retake_seed": job.retake_seeds[index] if job.retake_seeds else None,
                "retake_seeds": list(job.retake_seeds),
                "audio_path": paths[index],
                "audio_paths": paths,
                "audio_duration": result.waveforms.shape[-1] / OUTPUT_SAMPLE_RATE,
                "target_duration": result.duration,
                "sample_rate": OUTPUT_SAMPLE_RATE,
                "format": encoding.record(),
                "timings": timings,
                "triton": {"url": self.settings.triton_url, "protocol": self.settings.triton_protocol,
                           "model": ENSEMBLE_NAME},
            })
        timings["audio_duration"] = result.waveforms.shape[-1] / OUTPUT_SAMPLE_RATE
        return timings

    def _remove(self, names: list[str]) -> None:
        for name in names:
            for path in (self.outputs.root / name, self.outputs.root / self.outputs.sidecar_name(name)):
                path.unlink(missing_ok=True)

    def referenced_files(self) -> set[str]:
        """File names that pending jobs of this store will write or read (their source audio), and those
        being written or read now."""
        names = self.writing | self.reading
        for job in self.store.pending():
            names.update(self.outputs.item_names(job.output_name, max(1, len(job.request["actual_seeds"]))))
            names.update(job.request[f] for f in SOURCE_NAME_FIELDS if job.request.get(f) is not None)
        return names


def _timings(result: GenerationResult, check_s: float, source_s: float, queued_s: float, triton_s: float,
             write_s: float, total_s: float) -> dict[str, Any]:
    """Per-request seconds: the contract's four headers' values (prep: the gateway's checks, reading the
    source audio and Triton's preprocess), every stage, the wait in the queue, the Triton round trip and
    the writing."""
    stages = result.timings
    return {
        "total": total_s,
        "init": result.connect_seconds,
        "prep": check_s + source_s + stages["preprocess"],
        "source": source_s,
        "generation_detailed": sum(seconds for stage, seconds in stages.items() if stage != "preprocess"),
        "queued": queued_s,
        "triton": triton_s,
        "write": write_s,
        "stages": dict(stages),
    }


def in_request_terms(exc: ParameterError | EngineRejected, source_ref: tuple[str, str] | None) -> Exception:
    """The engine's refusal as the client asked: one naming the tensors that carry the source audio
    (SRC_AUDIO, SRC_SAMPLE_RATE) names the request field that gave it instead."""
    name, separator, why = str(exc).partition(": ")
    if source_ref is not None and separator and name in SOURCE_INPUTS:
        return EngineRejected(f"{source_ref[0]}: {why}")
    return exc


def retake_seeds_of(task: str, result: GenerationResult) -> tuple[int, ...]:
    """The retake seeds to report: the engine's, for the tasks that read them."""
    return result.retake_seeds if "retake_seeds" in TASK_FIELDS[task] else ()


def check_request(request: GenerateRequest, settings: Settings, outputs: OutputStore,
                  sources: SourceFiles) -> dict[str, Any]:
    """Everything about a request that can be refused before it runs (ParameterError naming the field);
    the request as it will be served: deploy fields resolved, output_path chosen, a source audio kept
    by its name."""
    check_deployment(request, settings)
    params = request.generation_params()
    source = request.source(params.task)
    if source is not None:
        validate_source(params, sources.check(*source).stand_in())
    suffix = request.encoding().format.suffix
    name = outputs.new_audio_name(suffix) if request.output_path is None else outputs.check_audio_name(
        request.output_path, suffix)
    return request.model_dump() | {"bf16": settings.bf16, "torch_compile": settings.torch_compile,
                                   "device_id": settings.device_id, "output_path": name}


def check_deployment(request: GenerateRequest, settings: Settings) -> None:
    """Refuse deploy-time choices this deployment does not serve (ParameterError naming the field)."""
    asked, served = request.checkpoint_path, settings.checkpoint_path
    if os.path.normpath(asked) != os.path.normpath(served) and os.path.realpath(asked) != os.path.realpath(served):
        raise ParameterError("checkpoint_path", f"this deployment serves {served!r}, got {asked!r}")
    for field, served_value in (
        ("bf16", settings.bf16),
        ("torch_compile", settings.torch_compile),
        ("device_id", settings.device_id),
    ):
        value = getattr(request, field)
        if value is not None and value != served_value:
            raise ParameterError(field, f"this deployment serves {field}={json.dumps(served_value)}, got {json.dumps(value)}")
