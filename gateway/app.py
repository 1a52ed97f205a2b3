"""The FastAPI application: POST /generate, /jobs, /uploads, GET /download/{filename}, GET /health, /health/live."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from acestep_triton.contract import ParameterError
from gateway.engine import GenerationEngine, TritonEngine
from gateway.errors import JobConflict, NotAuthorized, UploadInUse, install_error_handlers
from gateway.formats import AUDIO_MEDIA_TYPES, MEDIA_TYPES
from gateway.health import HealthMonitor
from gateway.jobs import DISCONNECT_REASON, JobManager
from gateway.jobstore import Job, JobState, SQLiteJobStore
from gateway.middleware import BodyLimitMiddleware, RequestIdMiddleware, SecurityHeadersMiddleware
from gateway.outputs import OutputStore
from gateway.request_ids import HEADER as REQUEST_ID_HEADER
from gateway.retention import Retention
from gateway.schema import (
    DOWNLOAD_HEADERS,
    GENERATE_HEADERS,
    IDEMPOTENCY_HELP,
    JOB_HEADERS,
    ErrorBody,
    GenerateRequest,
    HealthBody,
    JobPage,
    JobView,
    LiveBody,
    UnhealthyBody,
    UploadList,
    UploadView,
)
from gateway.settings import Settings
from gateway.uploads import FILE_FIELD, SourceFiles, UploadStore

log = logging.getLogger("gateway")
API_VERSION = "1.0"
JOBS_DATABASE = ".jobs.sqlite3"  # hidden: /download never serves it, retention never removes it
AUDIO_CONTENT = {t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_MEDIA_TYPES}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "Invalid parameters; the detail names the field.",
        401: "Missing or wrong API key (only when the deployment sets one).",
        404: "No such file in the outputs directory, no such job, or no such upload.",
        409: "The job has already finished (the detail gives its state), or /generate's job was cancelled; "
        "or the upload is the source of a queued or running job.",
        413: "The request body or upload is larger than the deployment accepts (ACESTEP_MAX_BODY_BYTES, "
        "ACESTEP_MAX_UPLOAD_BYTES).",
        429: "Too many generations queued or running; Retry-After gives seconds from the measured rate.",
        500: "Generation failed.",
        503: "Triton is unreachable or a model cannot serve now (Retry-After: the measured recovery time), "
        "or the gateway is shutting down.",
        504: "The request did not finish within the deployment's deadline (ACESTEP_JOB_DEADLINE_S).",
        507: "The outputs directory is full; nothing was written.",
    }
    return {s: {"model": ErrorBody, "description": meaning[s]} for s in statuses}


def _server_timing(timings: dict[str, Any]) -> str:
    metrics = {"init": timings["init"], "prep": timings["prep"], **timings["stages"]}
    metrics |= {"queued": timings["queued"], "triton": timings["triton"], "write": timings["write"],
                "total": timings["total"]}
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in metrics.items())


def _generate_headers(job: Job, outputs: OutputStore) -> dict[str, str]:
    """The contract's headers for a finished job (plus seeds, retake seeds where the task reads them,
    files, duration and the job id)."""
    timings = job.timings
    headers = {
        "X-Job-Id": job.id,
        "X-Output-Path": str(outputs.root / job.files[0]),
        "X-Generation-Time": f"{timings['total']:.6f}",
        "X-Init-Time": f"{timings['init']:.6f}",
        "X-Prep-Time": f"{timings['prep']:.6f}",
        "X-Generation-Time-Detailed": f"{timings['generation_detailed']:.6f}",
        "Server-Timing": _server_timing(timings),
        "X-Actual-Seeds": ",".join(str(s) for s in job.seeds),
        "X-Output-Files": ",".join(job.files),
        "X-Audio-Duration": f"{timings['audio_duration']:.6f}",
    }
    if job.retake_seeds:
        headers["X-Retake-Seeds"] = ",".join(str(s) for s in job.retake_seeds)
    return headers


async def _disconnected(http: Request) -> None:
    """Returns once the client has gone (the request body is already read, so the next ASGI message is
    the disconnect; uvicorn and the test client send it when the connection closes)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings | None = None, engine: GenerationEngine | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment) in front of `engine` (default: Triton)."""
    settings = settings or Settings.from_env()
    if engine is None:
        engine = TritonEngine(settings.triton_url, settings.triton_protocol, settings.triton_timeout_s,
                              settings.probe_timeout_s)
    store = OutputStore(settings.outputs_dir)
    uploads = UploadStore(settings.uploads_dir, settings.max_upload_bytes, settings.max_upload_s)
    job_store = SQLiteJobStore(store.root / JOBS_DATABASE)
    health = HealthMonitor(engine, settings.health_interval_s, settings.recovery_estimate_s)
    jobs = JobManager(settings, engine, store, job_store, SourceFiles(uploads, store), health)
    retention = Retention(settings, store, jobs, uploads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await health.check()
        await jobs.start()
        loop = asyncio.get_running_loop()
        background = [loop.create_task(retention.run_forever(), name="retention"),
                      loop.create_task(health.run_forever(), name="health")]
        yield
        for task in background:
            task.cancel()
        await jobs.stop()
        await engine.aclose()
        job_store.close()

    app = FastAPI(
        title="ACE-Step inference API",
        version=API_VERSION,
        description="Text-to-music generation with ACE-Step v1-3.5B served by Triton Inference Server. "
        "Errors are always JSON {\"detail\": \"...\"}.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.engine, app.state.store, app.state.jobs = settings, engine, store, jobs
    app.state.retention, app.state.uploads, app.state.health = retention, uploads, health
    app.state.drain = lambda: jobs.drain(settings.shutdown_deadline_s)  # gateway.server calls it on SIGTERM
    install_error_handlers(app)
    _install_middleware(app, settings)
    auth = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []
    _add_upload_routes(app, uploads, jobs, auth)
    _add_audio_stream_route(app, jobs, store, retention, auth)

    def known_job(job_id: str) -> Job:
        """The job, or 404 before a streaming answer starts (a stream cannot change its status later)."""
        return jobs.get(job_id)

    def view(job: Job) -> JobView:
        """The job now: queue position and ETA recomputed."""
        return JobView.of(jobs.estimated(job))

    @app.post(
        "/generate",
        response_class=Response,
        dependencies=auth,
        summary="Generate music from a prompt and lyrics",
        responses={
            200: {
                "description": "The generated audio, 48 kHz stereo, in the requested format (the first item); "
                "default WAV with 32-bit float samples.",
                "content": AUDIO_CONTENT,
                "headers": GENERATE_HEADERS,
            },
            **_errors(400, 401, 409, 413, 429, 500, 503, 504, 507),
        },
    )
    async def generate(request: GenerateRequest, http: Request) -> Response:
        job, _ = jobs.submit(request, synchronous=True, request_id=http.state.request_id)
        finished = asyncio.ensure_future(jobs.wait(job.id))
        gone = asyncio.ensure_future(_disconnected(http))
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not finished.done():
            jobs.cancel(job.id, DISCONNECT_REASON)
            await finished
            raise JobConflict(f"job {job.id}: {DISCONNECT_REASON}")
        job = finished.result()
        if job.state is not JobState.SUCCEEDED:
            return JSONResponse({"detail": job.error}, status_code=job.error_status, headers={"X-Job-Id": job.id})
        body = await run_in_threadpool((store.root / job.files[0]).read_bytes)
        media_type = MEDIA_TYPES[os.path.splitext(job.files[0])[1].lower()]
        return Response(content=body, media_type=media_type, headers=_generate_headers(job, store))

    @app.post(
        "/jobs",
        status_code=202,
        response_model=JobView,
        dependencies=auth,
        summary="Submit a generation (the /generate body); poll it, stream its events, cancel it",
        responses={
            202: {"description": "Queued (or the job an earlier request with the same Idempotency-Key made).",
                  "headers": JOB_HEADERS},
            **_errors(400, 401, 413, 429, 503),
        },
    )
    async def submit_job(
        request: GenerateRequest,
        response: Response,
        http: Request,
        idempotency_key: Annotated[str | None, Header(max_length=200, description=IDEMPOTENCY_HELP)] = None,
    ) -> JobView:
        job, created = jobs.submit(request, idempotency_key, request_id=http.state.request_id)
        response.headers["Location"] = f"/jobs/{job.id}"
        response.headers["X-Job-Id"] = job.id
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return view(job)

    @app.get(
        "/jobs",
        response_model=JobPage,
        dependencies=auth,
        summary="Recent jobs, newest first, a page at a time",
        responses=_errors(400, 401),
    )
    async def list_jobs(
        limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
        before: Annotated[float | None, Query(description="The `next` cursor of the previous page.")] = None,
    ) -> JobPage:
        page = job_store.recent(limit, before)
        cursor = page[-1].created_at if len(page) == limit else None
        return JobPage(
            jobs=[view(job) for job in page],
            next=None if cursor is None else f"/jobs?limit={limit}&before={cursor!r}",
        )

    @app.get(
        "/jobs/{job_id}",
        response_model=JobView,
        dependencies=auth,
        summary="A job's state, progress, queue position, ETA, timings, results or error",
        responses=_errors(401, 404),
    )
    async def get_job(job_id: str) -> JobView:
        return view(jobs.get(job_id))

    @app.get(
        "/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        dependencies=auth,
        summary="Server-sent events: the job after every change, ending with its final state",
        responses={
            200: {"description": "text/event-stream; each event's id is its number (send Last-Event-ID to "
                  "resume), its type `progress` or the final state, its data the job as GET /jobs/{id} "
                  "at that moment; `: ping` comments keep a quiet stream open."},
            **_errors(401, 404),
        },
    )
    async def job_events(
        last_event_id: Annotated[int, Header(ge=0, description="Resume after this event number.")] = 0,
        job: Job = Depends(known_job),  # a local dependency: not inside Annotated, which resolves globally
    ) -> AsyncIterable[ServerSentEvent]:
        async for event in jobs.events(job.id, last_event_id):
            kind = str(event.job.state) if event.job.state.finished else "progress"
            # the snapshot as it was: a resumed stream repeats exactly what the first one sent
            yield ServerSentEvent(data=JobView.of(event.job).model_dump(mode="json"), event=kind, id=str(event.seq))

    @app.delete(
        "/jobs/{job_id}",
        response_model=JobView,
        dependencies=auth,
        summary="Cancel a queued or running job (its Triton request too); nothing is written for it",
        responses=_errors(401, 404, 409),
    )
    async def cancel_job(job_id: str) -> JobView:
        jobs.cancel(job_id)
        return view(await jobs.wait(job_id))

    @app.get(
        "/download/{filename}",
        response_class=FileResponse,
        dependencies=auth,
        summary="Download a generated file from the outputs directory",
        responses={
            200: {
                "description": "The file: audio in its format's media type, application/json for sidecars.",
                "content": {
                    **AUDIO_CONTENT,
                    "application/json": {"schema": {"type": "object"}},
                },
                "headers": DOWNLOAD_HEADERS,
            },
            **_errors(400, 401, 404),
        },
    )
    async def download(filename: str) -> FileResponse:
        start = time.perf_counter()
        path = store.lookup(filename)
        headers = {"X-Download-Time": f"{time.perf_counter() - start:.6f}", "X-File-Path": str(path)}
        media_type = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        retention.serving_started(path.name)
        return FileResponse(path, media_type=media_type, headers=headers, filename=path.name,
                            background=BackgroundTask(retention.serving_finished, path.name))

    _health_routes(app, store, health, jobs, job_store)
    app.openapi = lambda: _openapi(app)
    return app


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    """Outermost first: the request id (on every answer, the refusals below included), security headers,
    the body bound, then CORS only for the origins the deployment names (none by default: closed)."""
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key", "Idempotency-Key",
                                          "Last-Event-ID", REQUEST_ID_HEADER],
                           expose_headers=[*GENERATE_HEADERS, "X-Job-Id", "Retry-After", REQUEST_ID_HEADER])
    # POST /uploads (branch modes-gateway) streams its body to disk under its own bound, ACESTEP_MAX_UPLOAD_BYTES
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, exempt=("/uploads",))
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)


def _health_routes(app: FastAPI, store: OutputStore, health: HealthMonitor, jobs: JobManager,
                   job_store: SQLiteJobStore) -> None:
    """GET /health (readiness, the contract's shape) and GET /health/live (liveness)."""

    @app.get(
        "/health",
        response_model=HealthBody,
        summary="Ready to generate: the gateway, Triton and every model of its repository (readiness probe)",
        responses={
            200: {"description": "Ready: a generation sent now would run."},
            503: {"model": UnhealthyBody, "description": "Not ready; the detail says why, `models` names each "
                  "model that cannot serve and why. Retry-After: the measured recovery time."},
        },
    )
    async def ready():
        if jobs.draining:
            return JSONResponse({"status": "unhealthy", "detail": "the gateway is shutting down"}, 503)
        if not os.access(store.root, os.W_OK):
            return JSONResponse({"status": "unhealthy", "detail": f"outputs directory {store.root} is not writable"}, 503)
        readiness = await health.check()
        if not readiness.ready:
            return JSONResponse({"status": "unhealthy", "detail": readiness.detail, "models": readiness.models}, 503,
                                headers={"Retry-After": str(health.retry_after_s())})
        return {"status": "healthy"}

    @app.get(
        "/health/live",
        response_model=LiveBody,
        summary="The gateway process itself works (liveness probe): it answers and its job store reads",
        responses={503: {"model": UnhealthyBody, "description": "The job store cannot be read."}},
    )
    async def live():
        try:
            job_store.recent(1)
        except Exception:
            log.exception("liveness: the job store cannot be read")
            return JSONResponse({"status": "unhealthy", "detail": "the job store cannot be read"}, 503)
        return {"status": "alive"}


def _add_audio_stream_route(app: FastAPI, jobs: JobManager, store: OutputStore, retention: Retention,
                            auth: list) -> None:
    """GET /jobs/{id}/audio: a WAV job's audio while it is decoded (gateway/audio_stream.py)."""

    @app.get(
        "/jobs/{job_id}/audio",
        response_class=StreamingResponse,
        dependencies=auth,
        summary="A WAV job's audio as it is decoded: plays while it grows, ends as the job's file",
        responses={
            200: {"description": "WAV (the job's bit depth), chunked. Its header gives the whole length from "
                  "the start; the bytes are the job's file's bytes, the first of them sent while the vocoder "
                  "still decodes later chunks (gRPC deployments; over HTTP Triton reports no chunks and the "
                  "stream starts when the file is written). A job that fails or is cancelled ends the stream "
                  "early.", "content": {"audio/wav": {}}},
            **_errors(400, 401, 404, 409),
        },
    )
    async def job_audio(job_id: str, item: Annotated[int, Query(ge=0, description="Which item (seed), "
                                                                "0 for the first.")] = 0) -> StreamingResponse:
        job = jobs.get(job_id)
        request = GenerateRequest.model_validate(job.request)
        if request.format != "wav":
            raise JobConflict(f"job {job_id} writes {request.format}: audio streams are WAV, for WAV jobs "
                              "(its file is at /download once it succeeded)")
        items = max(1, len(request.actual_seeds))
        if item >= items:
            raise ParameterError("item", f"job {job_id} has {items} item(s), got item {item}")
        stream = jobs.audio_stream(job_id)

        async def body():
            sent = 0
            if stream is not None:
                while chunk := await stream.read(item, sent):
                    sent += len(chunk)
                    yield chunk
            finished = await jobs.wait(job_id)
            if finished.state is JobState.SUCCEEDED:
                name = finished.files[item]
                retention.serving_started(name)
                try:
                    data = await run_in_threadpool((store.root / name).read_bytes)
                finally:
                    retention.serving_finished(name)
                yield data[sent:]

        return StreamingResponse(body(), media_type="audio/wav", headers={"X-Job-Id": job_id})


def _add_upload_routes(app: FastAPI, uploads: UploadStore, jobs: JobManager, auth: list) -> None:
    """POST, GET /uploads and DELETE /uploads/{name}: the source audio of repaint, extend, edit and
    audio2audio (gateway/uploads.py)."""

    @app.post(
        "/uploads",
        status_code=201,
        response_model=UploadView,
        dependencies=auth,
        summary="Upload source audio (multipart/form-data, one part named `file`) for src_audio_path / "
        "ref_audio_input",
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [FILE_FIELD],
            "properties": {FILE_FIELD: {
                "type": "string",
                "format": "binary",
                "description": "Audio libsndfile decodes (wav, flac, ogg, mp3, ...), any sample rate, mono or "
                "stereo, at most ACESTEP_MAX_UPLOAD_S seconds and ACESTEP_MAX_UPLOAD_BYTES bytes.",
            }},
        }}}}},
        responses={
            201: {"description": "Stored; `name` is what src_audio_path / ref_audio_input take.",
                  "headers": {"Location": {"description": "The uploads list.", "schema": {"type": "string"}}}},
            **_errors(400, 401, 413),
        },
    )
    async def upload(request: Request, response: Response) -> UploadView:
        stored = await uploads.receive(request)
        response.headers["Location"] = "/uploads"
        return UploadView(**asdict(stored))

    @app.get(
        "/uploads",
        response_model=UploadList,
        dependencies=auth,
        summary="Every upload, newest first",
        responses=_errors(401),
    )
    async def list_uploads() -> UploadList:
        return UploadList(uploads=[UploadView(**asdict(u)) for u in await run_in_threadpool(uploads.all)])

    @app.delete(
        "/uploads/{name}",
        status_code=204,
        response_class=Response,
        dependencies=auth,
        summary="Remove an upload (409 while a queued or running job reads it)",
        responses=_errors(400, 401, 404, 409),
    )
    async def delete_upload(name: str) -> Response:
        path = uploads.path(name)
        if name in jobs.referenced_files():
            raise UploadInUse(f"name: {name!r} is the source of a queued or running job")
        path.unlink(missing_ok=True)
        return Response(status_code=204)


def _api_key_check(api_key: str):
    """A dependency accepting `X-API-Key: <key>` or `Authorization: Bearer <key>`."""
    header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer_scheme = HTTPBearer(auto_error=False)
    expected = api_key.encode("utf-8")

    async def require_api_key(
        header_key: str | None = Security(header_scheme),
        bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
    ) -> None:
        offered = header_key or (bearer.credentials if bearer else None)
        if offered is None or not hmac.compare_digest(offered.encode("utf-8"), expected):
            raise NotAuthorized("missing or wrong API key (send X-API-Key or Authorization: Bearer)")

    return require_api_key


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 answers: this API reports invalid input as 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
