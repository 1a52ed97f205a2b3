"""What the gateway knows about whether the engine can serve: the readiness behind /health, the wait of
queued jobs through an outage, and the Retry-After of requests refused meanwhile.

`HealthMonitor` checks the engine every `interval_s` (Triton: live, every model READY). Triton cannot
see everything: a python-backend stub that died leaves its model READY while every request to it
fails. So a generation that fails makes the job manager ask `outage()`, which probes every model
(a request of zeros each, gateway.engine.probe_inputs) and asks Triton again a moment later; a
model that fails its probe is
*suspect* and counts as not ready, probed again at every check, until it passes (the supervisor
reloaded it, acestep_triton.supervisor) — so a reload too quick for the interval is not missed, and
without a supervisor /health keeps saying which model is broken.

An outage runs from the first check that is not ready to the first that is; its measured length
(the mean of the recent ones) is what Retry-After promises, `recovery_estimate_s` before any was seen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from gateway.engine import GenerationEngine, Readiness

log = logging.getLogger("gateway")
OUTAGES_KEPT = 5  # outages whose mean is the recovery estimate
SECOND_LOOK_S = 2.0  # acestep_triton.supervisor polls its stubs every 0.5 s


class HealthMonitor:
    """The latest readiness of `engine`, its suspect models, and the outages measured (module docstring)."""

    def __init__(self, engine: GenerationEngine, interval_s: float, recovery_estimate_s: float) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.recovery_estimate_s = recovery_estimate_s
        self.readiness = Readiness(False, "not checked yet")
        self.outages: list[float] = []  # measured lengths, seconds, latest last
        self._suspects: dict[str, str] = {}
        self._down_since: float | None = None  # when the current outage began
        self._changed: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    async def check(self) -> Readiness:
        """Ask the engine now (suspect models probed again) and record the answer."""
        return await self._check(probe_all=False)

    async def outage(self) -> bool:
        """After a failed generation: whether an outage cut it off. Every model is probed at once, and
        Triton asked again SECOND_LOOK_S later: a supervisor reacting to a dead stub of a model with
        several instances (the probe may reach a live one) has unloaded the model by then."""
        if not (await self._check(probe_all=True)).ready:
            return True
        await asyncio.sleep(SECOND_LOOK_S)
        return not (await self.check()).ready

    async def _check(self, probe_all: bool) -> Readiness:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one check at a time: the suspects change only here
            readiness = await self.engine.ready()
            if readiness.ready and (probe_all or self._suspects):
                self._suspects = await self.engine.probe(None if probe_all else list(self._suspects))
            if self._suspects and (readiness.ready or readiness.models):
                readiness = Readiness.of({**self._suspects, **readiness.models})  # Triton's word is newer
            self._record(readiness)
            return readiness

    def _record(self, readiness: Readiness) -> None:
        """Keep the answer; on a change, log it, measure the outage that ended, wake the waiters."""
        was_ready, self.readiness = self.readiness.ready, readiness
        if readiness.ready == was_ready:
            return
        now = time.monotonic()
        if not readiness.ready:
            self._down_since = now
            log.warning("not ready: %s", readiness.detail)
        elif self._down_since is not None:  # not the first check after start-up
            length = now - self._down_since
            self.outages = (self.outages + [length])[-OUTAGES_KEPT:]
            self._down_since = None
            log.warning("ready again after %.1f s", length)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_ready(self) -> None:
        """Returns once a check found the engine ready."""
        while not self.readiness.ready:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    def retry_after_s(self) -> int:
        """Whole seconds until the outage should be over: the measured recovery time minus the time
        already spent in this outage (at least 1)."""
        expected = sum(self.outages) / len(self.outages) if self.outages else self.recovery_estimate_s
        spent = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        return max(1, math.ceil(expected - spent))

    async def run_forever(self) -> None:
        """Check every interval_s until cancelled; an engine that raises is logged and counted not ready."""
        while True:
            try:
                await self.check()
            except Exception as exc:  # the monitor must outlive any engine failure
                log.exception("health check failed")
                self._record(Readiness(False, f"health check failed ({type(exc).__name__})"))
            await asyncio.sleep(self.interval_s)
