"""Keep one tritonserver serving: restart it when it exits, reload a model whose python-backend stub died.

The python backend runs every model instance in a stub process of its own. When a stub dies (an
out-of-memory kill, a CUDA fault), Triton 2.51 keeps reporting the model ready and answers every
request for that instance with "Stub process '<instance>' is not healthy", for as long as the
server runs. The supervisor watches the stubs of its server (its process group) every `poll_s`: a
stub that is gone makes it reload the model through Triton's model-control API (the server runs
with --model-control-mode=explicit): unload, then load, which starts new stubs. Unloading a model
an ensemble composes unloads the ensemble with it; the load brings both back. Meanwhile Triton's
repository index reports the model UNLOADING, LOADING, then READY, which is what the gateway's
readiness reads. State that lived in the dead stub (dit_step's condition cache) is gone with it:
the loop's next call misses and sends its conditions again (acestep_triton.condition_cache).

When the server process exits, the supervisor logs its last lines and starts it again after a
backoff: `min_backoff_s`, doubling up to `max_backoff_s`, back to the minimum once a server stayed
up `stable_s`. A reload that fails restarts the server the same way. Every recovery is logged and
kept in `recoveries` with its measured duration (detection to ready).

    python -m acestep_triton.supervisor --model-repository DIR [--grpc-port 8011 ...]

runs a supervised server in the foreground (the options of `python -m acestep_triton.tritonserver`)
until Ctrl-C or SIGTERM; `make serve` (acestep_triton.serve) supervises its server the same way.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from acestep_triton.tritonserver import (
    TritonServer,
    TritonServerError,
    add_server_arguments,
    run_in_foreground,
    server_from_arguments,
    stub_processes,
)

log = logging.getLogger("acestep_triton.supervisor")
LOG_LINES = 30  # of the server's log, shown when it exited


@dataclass(frozen=True)
class Recovery:
    """One repair: `action` "reload" (of `target`, a model) or "restart" (`target` tritonserver)."""

    action: str
    target: str
    reason: str
    seconds: float  # from detection until the server was ready again (or gave up)
    ok: bool


class Supervisor:
    """Runs `server` and keeps it serving from a watcher thread, until `stop()`."""

    def __init__(self, server: TritonServer, poll_s: float = 0.5, min_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0) -> None:
        self.server = server
        self.poll_s = poll_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.recoveries: list[Recovery] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._instances: dict[str, str] = {}  # instance -> model, as the server started them
        self._backoff_s = min_backoff_s
        self._up_since = 0.0

    def start(self) -> None:
        """Start the server (blocking until it is ready, raising TritonServerError like it), then watch it."""
        self.server.start()
        self._started()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and stop the server (a start in progress is aborted); idempotent."""
        self._stopping.set()
        self.server.stop()
        if self._thread is not None:
            self._thread.join()
        self.server.stop()  # one the watcher may have started meanwhile

    def _started(self) -> None:
        self._up_since = time.monotonic()
        self._instances = self._alive()

    def _alive(self) -> dict[str, str]:
        process = self.server.process
        if process is None:
            return {}
        return {stub.instance: stub.model for stub in stub_processes(process.pid)}

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            process = self.server.process
            if process is None:
                self._restart("tritonserver is not running (its last start failed)")
                continue
            code = process.poll()
            if code is not None:
                self._restart(f"tritonserver exited with code {code}")
                continue
            if time.monotonic() - self._up_since > self.stable_s:
                self._backoff_s = self.min_backoff_s
            alive = self._alive()
            dead = {model for instance, model in self._instances.items() if instance not in alive}
            for model in sorted(dead):
                gone = sorted(i for i, m in self._instances.items() if m == model and i not in alive)
                if not self._reload(model, f"stub process of {', '.join(gone)} died"):
                    break  # the server was restarted: every stub is new

    def _reload(self, model: str, reason: str) -> bool:
        """Reload `model`; when that fails, restart the server. Whether the reload succeeded."""
        log.warning("%s: reloading %s", reason, model)
        start = time.monotonic()
        try:
            self.server.reload_model(model)
        except (TritonServerError, OSError) as error:
            self._record("reload", model, reason, start, ok=False)
            self._restart(f"reloading {model} failed: {error}")
            return False
        alive = self._alive()
        self._instances = {i: m for i, m in self._instances.items() if m != model}
        self._instances.update({i: m for i, m in alive.items() if m == model})
        seconds = self._record("reload", model, reason, start, ok=True)
        log.warning("%s is serving again after %.1f s", model, seconds)
        return True

    def _restart(self, reason: str) -> None:
        """Stop what is left of the server, wait the backoff, start it; on failure the next tick retries."""
        log.error("%s; last lines of its log (%s):\n%s", reason, self.server.log_path,
                  self.server.log_tail(LOG_LINES))
        start = time.monotonic()
        self.server.stop()
        if self._stopping.wait(self._backoff_s):
            return
        self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
        log.warning("starting tritonserver again (%s)", reason)
        try:
            self.server.start()
        except TritonServerError as error:
            self._record("restart", "tritonserver", reason, start, ok=False)
            log.error("tritonserver did not start again: %s", error)
            return
        self._started()
        seconds = self._record("restart", "tritonserver", reason, start, ok=True)
        log.warning("tritonserver is serving again after %.1f s", seconds)

    def _record(self, action: str, target: str, reason: str, start: float, ok: bool) -> float:
        seconds = time.monotonic() - start
        self.recoveries.append(Recovery(action, target, reason, seconds, ok))
        return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run a supervised tritonserver in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m acestep_triton.supervisor", description=main.__doc__)
    add_server_arguments(parser)
    server = server_from_arguments(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    supervisor = Supervisor(server)

    def until_a_signal() -> int:
        while True:
            signal.pause()

    return run_in_foreground(server, supervisor.start, until_a_signal, supervisor.stop)


if __name__ == "__main__":
    sys.exit(main())
