"""The FastAPI application: POST /generate, GET /download/{filename}, GET /health."""

from __future__ import annotations

import hmac
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from acestep_triton.contract import ENSEMBLE_NAME, OUTPUT_SAMPLE_RATE, GenerationResult, ParameterError
from gateway.engine import GenerationEngine, TritonEngine
from gateway.errors import NotAuthorized, install_error_handlers
from gateway.outputs import OutputStore, encode_wav
from gateway.schema import (
    DOWNLOAD_HEADERS,
    GENERATE_HEADERS,
    ErrorBody,
    GenerateRequest,
    HealthBody,
    UnhealthyBody,
)
from gateway.settings import Settings

API_VERSION = "1.0"
MEDIA_TYPES = {".wav": "audio/wav", ".json": "application/json"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "Invalid parameters; the detail names the field.",
        401: "Missing or wrong API key (only when the deployment sets one).",
        404: "No such file in the outputs directory.",
        500: "Generation failed.",
        503: "Triton is unreachable or not ready.",
    }
    return {s: {"model": ErrorBody, "description": meaning[s]} for s in statuses}


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


def _timings(
    result: GenerationResult, gateway_prep_s: float, triton_s: float, write_s: float, total_s: float
) -> dict[str, Any]:
    """Per-request seconds: the contract's four headers' values plus every stage."""
    stages = result.timings
    return {
        "total": total_s,
        "init": result.connect_seconds,
        "prep": gateway_prep_s + stages["preprocess"],
        "generation_detailed": sum(seconds for stage, seconds in stages.items() if stage != "preprocess"),
        "triton": triton_s,
        "write": write_s,
        "stages": dict(stages),
    }


def _server_timing(timings: dict[str, Any]) -> str:
    metrics = {"init": timings["init"], "prep": timings["prep"], **timings["stages"]}
    metrics |= {"triton": timings["triton"], "write": timings["write"], "total": timings["total"]}
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in metrics.items())


def create_app(settings: Settings | None = None, engine: GenerationEngine | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment) in front of `engine` (default: Triton)."""
    settings = settings or Settings.from_env()
    if engine is None:
        engine = TritonEngine(settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)
    store = OutputStore(settings.outputs_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.aclose()

    app = FastAPI(
        title="ACE-Step inference API",
        version=API_VERSION,
        description="Text-to-music generation with ACE-Step v1-3.5B served by Triton Inference Server. "
        "Errors are always JSON {\"detail\": \"...\"}.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.engine, app.state.store = settings, engine, store
    install_error_handlers(app)
    auth = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []

    @app.post(
        "/generate",
        response_class=Response,
        dependencies=auth,
        summary="Generate music from a prompt and lyrics",
        responses={
            200: {
                "description": "The generated audio: 48 kHz stereo WAV, 32-bit float samples (the first item).",
                "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}}},
                "headers": GENERATE_HEADERS,
            },
            **_errors(400, 401, 500, 503),
        },
    )
    async def generate(request: GenerateRequest) -> Response:
        start = time.perf_counter()
        check_deployment(request, settings)
        name = store.new_audio_name() if request.output_path is None else store.check_audio_name(request.output_path)
        params = request.generation_params()
        gateway_prep_s = time.perf_counter() - start

        triton_start = time.perf_counter()
        result = await engine.generate(params)
        triton_s = time.perf_counter() - triton_start

        write_start = time.perf_counter()
        names = store.item_names(name, len(result.seeds))
        wav_bytes = await run_in_threadpool(_write_audio, store, names, result)
        write_s = time.perf_counter() - write_start
        timings = _timings(result, gateway_prep_s, triton_s, write_s, time.perf_counter() - start)

        served = request.model_dump() | {
            "bf16": settings.bf16,
            "torch_compile": settings.torch_compile,
            "device_id": settings.device_id,
            "output_path": name,
        }
        paths = [str(store.root / n) for n in names]
        await run_in_threadpool(_write_sidecars, store, names, paths, served, result, timings, settings)
        headers = {
            "X-Output-Path": paths[0],
            "X-Generation-Time": f"{timings['total']:.6f}",
            "X-Init-Time": f"{timings['init']:.6f}",
            "X-Prep-Time": f"{timings['prep']:.6f}",
            "X-Generation-Time-Detailed": f"{timings['generation_detailed']:.6f}",
            "Server-Timing": _server_timing(timings),
            "X-Actual-Seeds": ",".join(str(s) for s in result.seeds),
            "X-Output-Files": ",".join(names),
            "X-Audio-Duration": f"{result.waveforms.shape[-1] / OUTPUT_SAMPLE_RATE:.6f}",
        }
        return Response(content=wav_bytes, media_type="audio/wav", headers=headers)

    @app.get(
        "/download/{filename}",
        response_class=FileResponse,
        dependencies=auth,
        summary="Download a generated file from the outputs directory",
        responses={
            200: {
                "description": "The file (audio/wav for audio, application/json for sidecars).",
                "content": {
                    "audio/wav": {"schema": {"type": "string", "format": "binary"}},
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
        return FileResponse(path, media_type=media_type, headers=headers, filename=path.name)

    @app.get(
        "/health",
        response_model=HealthBody,
        summary="Ready to generate: gateway, Triton and the acestep model",
        responses={
            200: {"description": "The gateway, Triton and the acestep model are ready."},
            503: {"model": UnhealthyBody, "description": "Not ready; the detail says why."},
        },
    )
    async def health():
        if not os.access(store.root, os.W_OK):
            return JSONResponse({"status": "unhealthy", "detail": f"outputs directory {store.root} is not writable"}, 503)
        ok, reason = await engine.ready()
        if not ok:
            return JSONResponse({"status": "unhealthy", "detail": reason}, 503)
        return {"status": "healthy"}

    app.openapi = lambda: _openapi(app)
    return app


def _write_audio(store: OutputStore, names: list[str], result: GenerationResult) -> bytes:
    """Write every item atomically; return the first item's WAV bytes (the response body)."""
    first = b""
    for index, name in enumerate(names):
        data = encode_wav(result.waveforms[index], OUTPUT_SAMPLE_RATE)
        store.write_bytes(name, data)
        first = first or data
    return first


def _write_sidecars(
    store: OutputStore,
    names: list[str],
    paths: list[str],
    request: dict[str, Any],
    result: GenerationResult,
    timings: dict[str, Any],
    settings: Settings,
) -> None:
    """One `<stem>_input_params.json` per item: the request as served, the seeds and the timings."""
    for index, name in enumerate(names):
        store.write_json(
            store.sidecar_name(name),
            {
                "request": request,
                "item": index,
                "seed": result.seeds[index],
                "actual_seeds": list(result.seeds),
                "audio_path": paths[index],
                "audio_paths": paths,
                "audio_duration": result.waveforms.shape[-1] / OUTPUT_SAMPLE_RATE,
                "target_duration": result.duration,
                "sample_rate": OUTPUT_SAMPLE_RATE,
                "timings": timings,
                "triton": {"url": settings.triton_url, "protocol": settings.triton_protocol, "model": ENSEMBLE_NAME},
            },
        )


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
