"""Retention: every `retention_interval_s`, outputs and finished jobs older than `retention_s` and
uploads older than `upload_retention_s` are removed.

Never removed: hidden files (the job database and its WAL, temp files of writes and uploads in
progress), files a /download is sending, files being written or read (a job's source audio being
decoded), files a queued or running job will write (its output name and item names, with their
sidecars) and the source audio it will read (an upload or an earlier output, by name). A file's age
is its modification time, so a file replaced by a new request under the same output_path starts again.
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
from gateway.uploads import UploadStore

log = logging.getLogger("gateway")


class Retention:
    def __init__(self, settings: Settings, outputs: OutputStore, jobs: JobManager, uploads: UploadStore) -> None:
        self.settings = settings
        self.outputs = outputs
        self.jobs = jobs
        # each directory swept, with the age past which its files go
        self.directories: tuple[tuple[Path, float], ...] = (
            (outputs.root, settings.retention_s),
            (uploads.root, settings.upload_retention_s),
        )
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
        """Remove what is older than its retention period; the file names removed."""
        now = time.time() if now is None else now
        for job in self.jobs.store.finished_before(now - self.settings.retention_s):
            self.jobs.store.delete(job.id)
        keep = self.protected()
        removed = []
        for directory, retention_s in self.directories:
            cutoff = now - retention_s
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
