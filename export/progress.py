"""Progress lines for long export stages: what runs, for how long, and when it finished.

torch.export, the ONNX translation and TensorRT builds give no progress of their own and take
minutes at full size, so each stage prints its name, then the elapsed time while it runs (in
place on a terminal, every `QUIET_INTERVAL_S` seconds in a log), then its duration.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

TTY_INTERVAL_S = 1.0
QUIET_INTERVAL_S = 30.0


@contextmanager
def stage(label: str, stream: TextIO | None = None) -> Iterator[None]:
    """Print `label`, tick the elapsed seconds while the body runs, then its duration (or failure)."""
    out = stream or sys.stdout
    tty = out.isatty()
    interval = TTY_INTERVAL_S if tty else QUIET_INTERVAL_S
    start = time.perf_counter()
    finished = threading.Event()

    def tick() -> None:
        while not finished.wait(interval):
            elapsed = time.perf_counter() - start
            if tty:
                out.write(f"\r{label} ... {elapsed:.0f} s")
            else:
                out.write(f"{label} ... still running ({elapsed:.0f} s)\n")
            out.flush()

    out.write(f"{label} ...")
    out.write("" if tty else "\n")
    out.flush()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        finished.set()
        ticker.join()
        elapsed = time.perf_counter() - start
        out.write(f"{chr(13) if tty else ''}{label} ... {outcome} in {elapsed:.1f} s\n")
        out.flush()
