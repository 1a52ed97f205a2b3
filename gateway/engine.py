"""The generation engine: the gateway's one seam towards whatever makes audio.

`TritonEngine` sends a request to the `acestep` ensemble over gRPC (default) or
HTTP with tritonclient's asyncio clients, and maps Triton's failures onto the
gateway's error types. A client is built lazily on the running event loop and
thrown away whenever Triton could not be reached, so a Triton that was stopped
and started again is picked up on the next request without restarting the
gateway. `ready` reads Triton's repository index (each model's state and
reason); `probe` sends models a request of zeros each, which finds what the
index cannot: a model instance whose python-backend stub died (gateway.health).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from acestep_triton.contract import (
    ENSEMBLE_NAME,
    STREAM_AUDIO,
    STREAM_MODEL_NAME,
    GenerationParams,
    GenerationResult,
    SourceAudio,
    parse_stream_error,
)
from acestep_triton.ensemble_client import MalformedAnswer, audio_chunk, infer_inputs, read_result
from gateway.errors import EngineFailed, EngineRejected, EngineUnavailable

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Progress:
    """Where a generation is: the contract stage now running and, in `diffusion`, steps done of all.
    A streaming vocoder's report also carries its chunk: `audio` [items, 2, n] float32 holding output
    samples audio_offset .. audio_offset + n of audio_samples."""

    stage: str
    step: int = 0
    steps: int = 0
    audio: np.ndarray | None = None
    audio_offset: int = 0
    audio_samples: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Readiness:
    """Whether a request could be served now; if not, why, and which models cannot serve (model -> why)."""

    ready: bool
    detail: str = ""
    models: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, models: Mapping[str, str]) -> Readiness:
        """Ready when no model is named; else not ready, the detail naming each model and why."""
        return cls(not models, "; ".join(f"{name}: {why}" for name, why in sorted(models.items())), dict(models))


class GenerationEngine(abc.ABC):
    """Turns validated parameters into audio; raises gateway.errors Engine* errors.

    Cancelling the task that awaits `generate` must stop the generation (for Triton: cancel its RPC).
    """

    @abc.abstractmethod
    async def generate(self, params: GenerationParams, progress: ProgressCallback | None = None,
                       source: SourceAudio | None = None, stream_audio: bool = False,
                       request_id: str = "") -> GenerationResult:
        """Generate one item per seed (one item when no seed is given), calling `progress` as stages and
        steps complete where the engine can observe them. `source` is the audio of the tasks that start
        from one (contract.AUDIO_INPUT_TASKS), None for the others. A request that only the source
        shows to be invalid (a repaint window past its end) raises contract.ParameterError or
        EngineRejected naming the field. With `stream_audio` an engine that can decodes the audio in
        chunks and reports each one (Progress.audio) before it returns; one that cannot ignores it.
        `request_id` travels with the request."""

    @abc.abstractmethod
    async def ready(self) -> Readiness:
        """What the engine reports about itself now (cheap: no inference)."""

    async def probe(self, models: Iterable[str] | None = None) -> dict[str, str]:
        """Send each model (every one when None) a request that exercises its instance; the models that
        failed it, with why. Engines without models of their own have nothing to probe."""
        return {}

    async def aclose(self) -> None:
        """Release connections; the engine may be used again afterwards."""


_UNAVAILABLE_GRPC = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.NOT_FOUND",
    "StatusCode.CANCELLED",
}
# Triton's own words (python backend and core, r24.10) when a model instance cannot run a request: its
# stub died, or the model is not loaded. A probe reads them in the text: a stream's errors carry no
# code, and a model's own errors may have any code.
CANNOT_RUN = ("is not healthy", "unknown model", "is not ready", "has no available versions")
# Triton's HTTP front end answers 404 for NOT_FOUND and 503 for UNAVAILABLE, but folds UNKNOWN and
# CANCELLED into 400 along with INVALID_ARG; gRPC (the default protocol) keeps them apart.
_UNAVAILABLE_HTTP = {"404", "503"}
# Triton's prefix on an error that a step of the ensemble answered (HTTP and plain gRPC infer).
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def _http_client_module():
    """tritonclient's HTTP client, imported only for an HTTP deployment: it pulls in gevent and
    brotli, which a gRPC gateway (the default) should not need installed."""
    import tritonclient.http.aio as httpclient

    return httpclient


if TYPE_CHECKING:
    import tritonclient.http.aio as httpclient

    TritonClient = grpcclient.InferenceServerClient | httpclient.InferenceServerClient


class TritonEngine(GenerationEngine):
    """The `acestep` ensemble on a Triton server at `url` (host:port), over "grpc" or "http"."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600.0, probe_timeout_s: float = 10.0,
                 ready_timeout_s: float = 2.0) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s  # a probe may wait behind a batch in the model's queue
        self.ready_timeout_s = ready_timeout_s  # the readiness calls are metadata: fast or broken
        self._client: TritonClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the models a request may use: the stream (gRPC) or the ensemble (HTTP, and direct clients)
        self.models = (ENSEMBLE_NAME, STREAM_MODEL_NAME) if protocol == "grpc" else (ENSEMBLE_NAME,)

    def _new_client(self) -> TritonClient:
        if self.protocol == "grpc":
            options = [
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                # Reconnect within a second of Triton coming back, not after gRPC's default 2-minute backoff.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            return grpcclient.InferenceServerClient(self.url, channel_args=options)
        return _http_client_module().InferenceServerClient(self.url, conn_timeout=self.timeout_s)

    def _connected(self) -> tuple[TritonClient, float]:
        """The client for the running loop, and the seconds spent building it (0 when reused)."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client, 0.0
        start = time.perf_counter()
        # A client bound to another (finished) loop cannot be closed from here; drop it.
        self._client, self._loop = self._new_client(), loop
        return self._client, time.perf_counter() - start

    async def _disconnect(self, client: TritonClient) -> None:
        """Drop `client` (if still current) so that the next call connects afresh."""
        if client is self._client:
            self._client = self._loop = None
            try:
                await client.close()
            except Exception:  # closing a broken connection may fail too; it is dropped either way
                log.debug("closing the Triton client failed", exc_info=True)

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._disconnect(self._client)
        self._client = self._loop = None

    async def ready(self) -> Readiness:
        """Triton live, and every model of its repository READY (Triton's state and reason otherwise)."""
        client, _ = self._connected()
        try:
            if not await asyncio.wait_for(client.is_server_live(), self.ready_timeout_s):
                return Readiness(False, f"Triton at {self.url} is not live")
            index = await asyncio.wait_for(self._index(client), self.ready_timeout_s)
        except (InferenceServerException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            await self._disconnect(client)
            return Readiness(False, f"Triton at {self.url} is unreachable")
        states = {m["name"]: m for m in index}
        models = {name: "not in Triton's model repository" for name in self.models if name not in states}
        for name, model in states.items():
            if model.get("state") != "READY":
                reason = f" ({model['reason']})" if model.get("reason") else ""
                models[name] = f"{model.get('state', 'UNAVAILABLE')}{reason}"
        return Readiness.of(models)

    async def _index(self, client: TritonClient) -> list[dict[str, Any]]:
        if self.protocol == "grpc":
            return list((await client.get_model_repository_index(as_json=True)).get("models", []))
        return list(await client.get_model_repository_index())

    async def probe(self, models: Iterable[str] | None = None) -> dict[str, str]:
        """Probe each model with a request of zeros built from its config (every input at its smallest
        shape): an instance that runs answers it, with outputs or with its own refusal of the values,
        in milliseconds; one that cannot run gets Triton's own error (CANNOT_RUN), a hung one nothing.
        A probe checks that an instance runs, not what it computes."""
        client, _ = self._connected()
        try:
            names = list(models) if models is not None else [m["name"] for m in await asyncio.wait_for(
                self._index(client), self.ready_timeout_s)]
        except (InferenceServerException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return {}  # unreachable: ready() says so
        failures = await asyncio.gather(*(self._probe_one(client, name) for name in names))
        return {name: why for name, why in zip(names, failures) if why}

    async def _probe_one(self, client: TritonClient, name: str) -> str:
        """"" when an instance of `name` executed the probe, else why not."""
        module = grpcclient if self.protocol == "grpc" else _http_client_module()
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                config = await client.get_model_config(name, as_json=True) if self.protocol == "grpc" else \
                    await client.get_model_config(name)
                config = config.get("config", config)
                inputs = probe_inputs(module, config)
                if not config.get("model_transaction_policy", {}).get("decoupled", False):
                    await client.infer(name, inputs)
                elif self.protocol == "grpc":
                    await self._probe_stream(client, name, inputs)
        except InferenceServerException as exc:
            if any(words in (exc.message() or "") for words in CANNOT_RUN):
                return f"failed a probe: {exc.message()}"
            return ""  # the model's own code answered (a refusal of the zeros, or an error of its own)
        except TimeoutError:
            return f"did not answer a probe within {self.probe_timeout_s:g} s"
        except (aiohttp.ClientError, OSError, grpc.aio.AioRpcError) as exc:
            return f"failed a probe: {exc}"
        return ""

    @staticmethod
    async def _probe_stream(client: grpcclient.InferenceServerClient, name: str, inputs: list) -> None:
        """A decoupled model's probe: its first answer on the stream (an error is raised for _probe_one)."""

        async def one_request():
            yield {"model_name": name, "inputs": inputs}

        responses = client.stream_infer(one_request())
        try:
            async for _, error in responses:
                if error is not None:
                    raise error
                return
        finally:
            responses.cancel()

    async def generate(self, params: GenerationParams, progress: ProgressCallback | None = None,
                       source: SourceAudio | None = None, stream_audio: bool = False,
                       request_id: str = "") -> GenerationResult:
        """Over gRPC: `acestep_stream`, reporting every stage and step to `progress` (and, with
        `stream_audio`, every chunk of audio); cancelling the awaiting task cancels the stream and
        Triton stops the loop after the step in flight. Over HTTP: the `acestep` ensemble, no progress
        and no audio chunks, and a cancel only closes the connection (Triton's HTTP front end has no
        request cancellation: the generation runs to its end there)."""
        client, connect_seconds = self._connected()
        if self.protocol == "grpc":
            flag = {STREAM_AUDIO.name: np.array([True])} if stream_audio else None
            inputs = infer_inputs(grpcclient, params, flag, source=source)
        else:
            inputs = infer_inputs(_http_client_module(), params, source=source)
        try:
            if self.protocol == "grpc":
                result = await asyncio.wait_for(self._stream(client, inputs, progress, request_id), self.timeout_s)
            else:
                result = await asyncio.wait_for(client.infer(ENSEMBLE_NAME, inputs, request_id=request_id),
                                                self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise EngineFailed(f"Triton's stream failed ({exc.code()}): {exc.details()}") from exc
            await self._disconnect(client)
            raise EngineUnavailable(f"Triton at {self.url} is unreachable") from None
        except InferenceServerException as exc:
            await self._raise_for(client, exc)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"Triton at {self.url} did not answer within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError):
            await self._disconnect(client)
            raise EngineUnavailable(f"Triton at {self.url} is unreachable") from None
        try:
            return read_result(result, connect_seconds)
        except MalformedAnswer as exc:
            raise EngineFailed(str(exc)) from None

    async def _stream(self, client: grpcclient.InferenceServerClient, inputs: list,
                      progress: ProgressCallback | None, request_id: str):
        """One request to `acestep_stream`: progress responses to `progress`, the final one returned.

        tritonclient's stream hands errors over as text only: the model names the code at its start
        (contract.stream_error_text), read here as the unary path reads the status.
        """

        async def one_request():
            yield {"model_name": STREAM_MODEL_NAME, "inputs": inputs, "request_id": request_id}

        responses = client.stream_infer(one_request())
        try:
            async for result, error in responses:
                if error is not None:
                    self._raise_for_stream(error.message())
                if result.as_numpy("WAVEFORM") is not None:
                    return result
                if progress is not None:
                    stage = result.as_numpy("STAGE").reshape(-1)[0].decode()
                    step, steps = (int(result.as_numpy(n).reshape(-1)[0]) for n in ("STEP", "STEPS"))
                    progress(Progress(stage, step, steps, *(audio_chunk(result) or ())))
        finally:
            responses.cancel()  # a no-op once the final response came; cancels Triton's request otherwise
        raise EngineFailed(f"{STREAM_MODEL_NAME} ended its stream without a result")

    @staticmethod
    def _raise_for_stream(text: str) -> None:
        code, message = parse_stream_error(text)
        if code == "INVALID_ARG":
            raise EngineRejected(message)
        if code == "UNAVAILABLE":
            raise EngineUnavailable(f"Triton could not run the request now: {message}")
        raise EngineFailed(f"Triton failed ({code}): {message}")

    async def _raise_for(self, client: TritonClient, exc: InferenceServerException) -> None:
        status = str(exc.status())
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            raise EngineRejected(_ENSEMBLE_PREFIX.sub("", exc.message())) from None
        if status in _UNAVAILABLE_GRPC or status in _UNAVAILABLE_HTTP:
            log.warning("Triton unavailable (%s): %s", status, exc.message())
            await self._disconnect(client)
            raise EngineUnavailable(f"Triton at {self.url} is unreachable or '{ENSEMBLE_NAME}' is not loaded") from None
        raise EngineFailed(f"Triton failed ({status}): {exc.message()}") from exc


def probe_inputs(module, config: Mapping[str, Any]) -> list:
    """tritonclient inputs of zeros for every required input of a model config (Triton's JSON form):
    variable dims of 1, a batch of 1 when the model batches, empty strings for BYTES."""
    batch = [1] if int(config.get("max_batch_size", 0)) > 0 else []
    inputs = []
    for spec in config.get("input", []):
        if spec.get("optional"):
            continue
        shape = batch + [1 if int(d) < 0 else int(d) for d in spec.get("dims", [])]
        dtype = spec["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
        array = np.full(shape, b"", dtype=np.object_) if dtype == "BYTES" else np.zeros(shape, triton_to_np_dtype(dtype))
        tensor = module.InferInput(spec["name"], shape, dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
