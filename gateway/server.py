"""uvicorn with a graceful shutdown for generations: what `python -m gateway` and `make serve` run.

On SIGTERM (or Ctrl-C) uvicorn alone would stop accepting connections, wait for open ones and then
cancel every job still running at the lifespan's end. `GatewayServer` first drains the app
(`app.state.drain`, gateway.jobs.JobManager.drain): new work is answered 503 while running
generations get up to ACESTEP_SHUTDOWN_DEADLINE_S to finish and write their files, queued jobs stay
queued; then uvicorn's own shutdown runs. A second Ctrl-C stops at once (as uvicorn's own), a repeated
SIGTERM (a process manager and a wrapper both sending one) does not. A drained exit is a clean one:
the process exits 0 (uvicorn would re-raise the signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("gateway")
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Event streams and downloads still open after the drain get this long before uvicorn cancels them.
CONNECTIONS_GRACE_S = 5.0


class GatewayServer(uvicorn.Server):
    """uvicorn serving `app` (gateway.app.create_app) with the drain above on the first signal."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
        # access lines come from gateway.middleware.RequestIdMiddleware, with the request id
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                        timeout_graceful_shutdown=CONNECTIONS_GRACE_S))
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain: asyncio.Future | None = None  # kept referenced while it runs

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's, without re-raising the signal afterwards."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
        elif not self._draining:
            self._draining = True
            log.warning("%s: draining (new work is refused, running generations may finish)", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)  # safe from a signal handler
        elif sig == signal.SIGINT:  # a second Ctrl-C stops at once; a repeated SIGTERM changes nothing
            self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drained())

    async def _drained(self) -> None:
        try:
            await self.app.state.drain()
        finally:
            self.should_exit = True
