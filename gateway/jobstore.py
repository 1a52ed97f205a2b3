"""Where jobs and their events live: one small interface, SQLite behind it.

The gateway only talks to `JobStore`. `SQLiteJobStore` is the embedded default: one file under the
outputs directory in WAL mode, so readers (GET /jobs, event streams) never block the writer. Each
call is one short transaction; they are made from the event loop directly (sub-millisecond on a
local file), which keeps the gateway single-threaded around its state.

A server database (PostgreSQL for several gateways) plugs in by implementing the same methods:
`jobs` and `job_events` tables as below, `create` as an INSERT ... ON CONFLICT (idempotency_key)
DO NOTHING followed by a SELECT, `append_event` numbering events with a per-job sequence inside the
same transaction (SELECT ... FOR UPDATE on the job row), and `claim`-style state changes guarded by
the state they expect (UPDATE ... WHERE state = 'queued'), so two gateways never run one job. The
per-process pieces (the running tasks, the bound on pending generations, the event wake-ups) would
then move to the database too: a LISTEN/NOTIFY channel for new events, and the bound counted in SQL.
"""

from __future__ import annotations

import abc
import enum
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
PENDING = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class Job:
    """One generation request and everything known about it.

    request: the body as submitted (GenerateRequest.model_dump(); a source audio by its name);
    retake_seeds: per item, for the tasks that read them; output_name: the first item's
    file name, fixed at submission; files: every file written (audio items and sidecars), set on
    success; timings: the /generate timings (seconds); error / error_status: why it failed and the
    HTTP status /generate answers for it; queue_position and eta_s: as they were when this snapshot
    was taken (GET /jobs/{id} recomputes them); request_id: the id of the HTTP request that submitted
    it (gateway.request_ids). Times are Unix seconds.
    """

    id: str
    state: JobState
    request: dict[str, Any]
    output_name: str
    created_at: float
    idempotency_key: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    stage: str = "queued"
    step: int = 0
    steps: int = 0
    progress: float = 0.0
    files: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    retake_seeds: tuple[int, ...] = ()
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_status: int | None = None
    queue_position: int = 0
    eta_s: float | None = None
    request_id: str | None = None

    def evolve(self, **changes: Any) -> Job:
        return replace(self, **changes)


@dataclass(frozen=True)
class JobEvent:
    """A snapshot of a job after a change; `seq` counts from 1 per job, with no gaps."""

    job_id: str
    seq: int
    job: Job


class JobStore(abc.ABC):
    """Jobs and their event history. Implementations must make `create` idempotent per key and number
    each job's events 1, 2, 3, ... with no gaps or repeats (event streams resume on those numbers)."""

    @abc.abstractmethod
    def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job; if its idempotency_key is taken, return that job instead. (job, created)."""

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def find(self, idempotency_key: str) -> Job | None:
        """The job submitted with this idempotency key, if any."""

    @abc.abstractmethod
    def save(self, job: Job) -> JobEvent:
        """Store the job's new state and append it as the job's next event."""

    @abc.abstractmethod
    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        """The job's events numbered above `seq`, in order."""

    @abc.abstractmethod
    def recent(self, limit: int, before: float | None = None) -> list[Job]:
        """Up to `limit` jobs, newest first, created before `before` (all when None)."""

    @abc.abstractmethod
    def pending(self) -> list[Job]:
        """Queued and running jobs, oldest first."""

    @abc.abstractmethod
    def finished_before(self, cutoff: float) -> list[Job]:
        """Finished jobs that finished before `cutoff`."""

    @abc.abstractmethod
    def delete(self, job_id: str) -> None:
        """Forget a job and its events."""

    def close(self) -> None:
        """Release the store's resources."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    idempotency_key TEXT UNIQUE,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


def _dump(job: Job) -> str:
    return json.dumps(asdict(job), allow_nan=False)


def _load(text: str) -> Job:
    values = json.loads(text)
    values["state"] = JobState(values["state"])
    values["files"] = tuple(values["files"])
    values["seeds"] = tuple(values["seeds"])
    values["retake_seeds"] = tuple(values.get("retake_seeds", ()))  # absent from rows of earlier versions
    return Job(**values)


class SQLiteJobStore(JobStore):
    """The embedded store: one SQLite file (WAL), one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def create(self, job: Job) -> tuple[Job, bool]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if job.idempotency_key is not None:
                    row = self._db.execute(
                        "SELECT body FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                    ).fetchone()
                    if row is not None:
                        self._db.execute("COMMIT")
                        return _load(row[0]), False
                self._db.execute(
                    "INSERT INTO jobs (id, state, created_at, finished_at, idempotency_key, body) VALUES (?, ?, ?, ?, ?, ?)",
                    (job.id, job.state, job.created_at, job.finished_at, job.idempotency_key, _dump(job)),
                )
                self._db.execute("INSERT INTO job_events (job_id, seq, body) VALUES (?, 1, ?)", (job.id, _dump(job)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job, True

    def get(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT body FROM jobs WHERE id = ?", (job_id,))
        return _load(rows[0][0]) if rows else None

    def find(self, idempotency_key: str) -> Job | None:
        rows = self._rows("SELECT body FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
        return _load(rows[0][0]) if rows else None

    def save(self, job: Job) -> JobEvent:
        body = _dump(job)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, body = ? WHERE id = ?",
                    (job.state, job.finished_at, body, job.id),
                )
                (last,) = self._db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM job_events WHERE job_id = ?", (job.id,)
                ).fetchone()
                self._db.execute("INSERT INTO job_events (job_id, seq, body) VALUES (?, ?, ?)", (job.id, last + 1, body))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return JobEvent(job.id, last + 1, job)

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        rows = self._rows("SELECT seq, body FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [JobEvent(job_id, s, _load(body)) for s, body in rows]

    def recent(self, limit: int, before: float | None = None) -> list[Job]:
        if before is None:
            rows = self._rows("SELECT body FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._rows(
                "SELECT body FROM jobs WHERE created_at < ? ORDER BY created_at DESC LIMIT ?", (before, limit)
            )
        return [_load(body) for (body,) in rows]

    def pending(self) -> list[Job]:
        rows = self._rows(
            "SELECT body FROM jobs WHERE state IN (?, ?) ORDER BY created_at", tuple(str(s) for s in PENDING)
        )
        return [_load(body) for (body,) in rows]

    def finished_before(self, cutoff: float) -> list[Job]:
        rows = self._rows("SELECT body FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,))
        return [_load(body) for (body,) in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
