"""The generation engine: the gateway's one seam towards whatever makes audio.

`TritonEngine` sends a request to the `acestep` ensemble over gRPC (default) or
HTTP with tritonclient's asyncio clients, and maps Triton's failures onto the
gateway's error types. A client is built lazily on the running event loop and
thrown away whenever Triton could not be reached, so a Triton that was stopped
and started again is picked up on the next request without restarting the
gateway.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from acestep_triton.contract import (
    ENSEMBLE_NAME,
    STREAM_MODEL_NAME,
    GenerationParams,
    GenerationResult,
    SourceAudio,
    parse_stream_error,
)
from acestep_triton.ensemble_client import MalformedAnswer, infer_inputs, read_result
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


class GenerationEngine(abc.ABC):
    """Turns validated parameters into audio; raises gateway.errors Engine* errors.

    Cancelling the task that awaits `generate` must stop the generation (for Triton: cancel its RPC).
    """

    @abc.abstractmethod
    async def generate(self, params: GenerationParams, progress: ProgressCallback | None = None,
                       source: SourceAudio | None = None, stream_audio: bool = False) -> GenerationResult:
        """Generate one item per seed (one item when no seed is given), calling `progress` as stages and
        steps complete where the engine can observe them. `source` is the audio of the tasks that start
        from one (contract.AUDIO_INPUT_TASKS), None for the others. A request that only the source
        shows to be invalid (a repaint window past its end) raises contract.ParameterError or
        EngineRejected naming the field. With `stream_audio` an engine that can decodes the audio in
        chunks and reports each one (Progress.audio) before it returns; one that cannot ignores it."""

    @abc.abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(True, "") when a request could be served now, else (False, why)."""

    async def aclose(self) -> None:
        """Release connections; the engine may be used again afterwards."""


_UNAVAILABLE_GRPC = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.NOT_FOUND",
    "StatusCode.CANCELLED",
}
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

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600.0, probe_timeout_s: float = 2.0) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
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

    async def ready(self) -> tuple[bool, str]:
        client, _ = self._connected()
        probes = (
            (client.is_server_live, (), "Triton at {url} is not live"),
            (client.is_server_ready, (), "Triton at {url} is not ready"),
            *(
                (client.is_model_ready, (model,), f"model '{model}' on Triton at {{url}} is not ready")
                for model in self.models
            ),
        )
        try:
            for probe, args, failure in probes:
                if not await asyncio.wait_for(probe(*args), self.probe_timeout_s):
                    return False, failure.format(url=self.url)
        except (InferenceServerException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            await self._disconnect(client)
            return False, f"Triton at {self.url} is unreachable"
        return True, ""

    async def generate(self, params: GenerationParams, progress: ProgressCallback | None = None,
                       source: SourceAudio | None = None, stream_audio: bool = False) -> GenerationResult:
        """Over gRPC: `acestep_stream`, reporting every stage and step to `progress` (and, with
        `stream_audio`, every chunk of audio); cancelling the awaiting task cancels the stream and
        Triton stops the loop after the step in flight. Over HTTP: the `acestep` ensemble, no progress
        and no audio chunks, and a cancel only closes the connection (Triton's HTTP front end has no
        request cancellation: the generation runs to its end there)."""
        client, connect_seconds = self._connected()
        inputs = infer_inputs(grpcclient if self.protocol == "grpc" else _http_client_module(), params, source=source)
        try:
            if self.protocol == "grpc":
                if stream_audio:
                    flag = grpcclient.InferInput("STREAM_AUDIO", [1], "BOOL")
                    flag.set_data_from_numpy(np.array([True]))
                    inputs.append(flag)
                result = await asyncio.wait_for(self._stream(client, inputs, progress), self.timeout_s)
            else:
                result = await asyncio.wait_for(client.infer(ENSEMBLE_NAME, inputs), self.timeout_s)
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
                      progress: ProgressCallback | None):
        """One request to `acestep_stream`: progress responses to `progress`, the final one returned.

        tritonclient's stream hands errors over as text only: the model names the code at its start
        (contract.stream_error_text), read here as the unary path reads the status.
        """

        async def one_request():
            yield {"model_name": STREAM_MODEL_NAME, "inputs": inputs}

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
                    audio = result.as_numpy("AUDIO")
                    if audio is None:
                        progress(Progress(stage, step, steps))
                    else:
                        offset, total = (int(result.as_numpy(n).reshape(-1)[0]) for n in ("AUDIO_OFFSET", "AUDIO_SAMPLES"))
                        progress(Progress(stage, step, steps, audio, offset, total))
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
