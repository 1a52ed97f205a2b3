"""Where the wall time of each call of a served model goes, for the benchmarks.

Torch- and Triton-free, so that benchmarks/bench_triton.py reads what the models write.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# A directory: every PhaseLog of the server's models writes its calls there (benchmarks).
PHASE_LOG_ENV = "ACESTEP_PHASE_LOG"


class PhaseLog:
    """Where the wall time of each call of a model goes, for the benchmarks: the call's phases in
    milliseconds, one JSON line per call in $ACESTEP_PHASE_LOG/<model>.<pid>.jsonl when that variable
    names a directory (benchmarks/bench_triton.py sets it and reads the files); otherwise `write`
    writes nothing and a call costs a few clock reads."""

    def __init__(self, model: str) -> None:
        folder = os.environ.get(PHASE_LOG_ENV)
        self.model = model
        self.file = open(Path(folder) / f"{model}.{os.getpid()}.jsonl", "a", buffering=1) if folder else None
        self.start()

    def start(self) -> None:
        """Begin a call: the next `mark` measures from now."""
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """The time since the previous mark (or `start`) belongs to `phase`."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self.last) * 1e3
        self.last = now

    def write(self, **fields) -> None:
        """Record the call (its phases and `fields`) and start the next one."""
        if self.file is not None:
            self.file.write(json.dumps({"model": self.model, "t": time.time(), **self.phases, **fields}) + "\n")
        self.start()
