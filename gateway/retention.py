"""Retention: outputs and finished jobs older than `retention_s` are removed every `retention_interval_s`.

Never removed: hidden files (the job database and its WAL, temp files of writes in progress), files a
/download is sending, files being written, and files a queued or running job will write (its output
name and item names, with their sidecars). A file's age is its modification time, so a file replaced
by a new request under the same output_path starts again.

Only the outputs directory exists today; a directory of uploaded source audio (audio2audio, repaint)
joins `directories` when it exists, under the same rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

from gateway.jobs import JobManager
from gateway.outputs import OutputStore
from gateway.settings import Settings

log = logging.getLogger("gateway")


class Retention:
    def __init__(self, settings: Settings, outputs: OutputStore, jobs: JobManager) -> None:
        self.settings = settings
        self.outputs = outputs
        self.jobs = jobs
        self.directories: tuple[Path, ...] = (outputs.root,)
        self._serving: Counter[str] = Counter()

    def serving_started(self, name: str) -> None:
        self._serving[name] += 1

    def serving_finished(self, name: str) -> None:
        self._serving[name] -= 1
        if self._serving[name] <= 0:
            del self._serving[name]

    def protected(self) -> set[str]:
        """File names that must stay whatever their age."""
        names = self.jobs.referenced_files() | set(self._serving)
        return names | {self.outputs.sidecar_name(name) for name in names}

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove what is older than the retention period; the file names removed."""
        cutoff = (time.time() if now is None else now) - self.settings.retention_s
        for job in self.jobs.store.finished_before(cutoff):
            self.jobs.store.delete(job.id)
        keep = self.protected()
        removed = []
        for directory in self.directories:
            for path in directory.iterdir():
                if path.name.startswith(".") or path.name in keep or path.is_symlink() or not path.is_file():
                    continue
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed

    async def run_forever(self) -> None:
        """Sweep now and then every retention_interval_s, until cancelled; a failed sweep is logged."""
        while True:
            try:
                removed = self.sweep()
                if removed:
                    log.info("retention removed %d files", len(removed))
            except OSError:
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.retention_interval_s)
