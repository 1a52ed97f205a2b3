"""The SQLite job store on its own: what the JobStore interface promises (idempotent create, gap-free
event numbers, pages, pending, retention queries) and that it all survives reopening the file."""

from __future__ import annotations

import sqlite3
import time

from gateway.jobstore import Job, JobState, SQLiteJobStore


def new_job(job_id: str, created_at: float, key: str | None = None) -> Job:
    return Job(id=job_id, state=JobState.QUEUED, request={"prompt": "x"}, output_name=f"{job_id}.wav",
               created_at=created_at, idempotency_key=key)


def test_create_is_idempotent_per_key(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    first, created = store.create(new_job("a", 1.0, key="k"))
    again, created_again = store.create(new_job("b", 2.0, key="k"))
    assert created and not created_again and again.id == "a" and store.get("b") is None
    assert store.find("k").id == "a" and store.find("other") is None


def test_events_are_numbered_without_gaps_and_read_after_a_number(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.create(new_job("a", 1.0))
    running = store.save(job.evolve(state=JobState.RUNNING, stage="diffusion", step=1))
    done = store.save(running.job.evolve(state=JobState.SUCCEEDED, finished_at=5.0, step=2))
    assert (running.seq, done.seq) == (2, 3)
    assert [e.seq for e in store.events_after("a", 0)] == [1, 2, 3]
    assert [e.job.state for e in store.events_after("a", 1)] == [JobState.RUNNING, JobState.SUCCEEDED]
    assert store.events_after("a", 3) == [] and store.get("a") == done.job


def test_pages_pending_retention_and_reopening(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    now = time.time()
    for i in range(5):
        store.create(new_job(f"j{i}", now + i))
    store.save(store.get("j0").evolve(state=JobState.FAILED, finished_at=now - 100))
    store.save(store.get("j1").evolve(state=JobState.RUNNING))
    store.close()

    store = SQLiteJobStore(path)  # a gateway restart sees everything
    first = store.recent(2)
    assert [j.id for j in first] == ["j4", "j3"]
    assert [j.id for j in store.recent(2, before=first[-1].created_at)] == ["j2", "j1"]
    assert [j.id for j in store.pending()] == ["j1", "j2", "j3", "j4"]
    assert [j.id for j in store.finished_before(now)] == ["j0"]
    store.delete("j0")
    assert store.get("j0") is None and store.events_after("j0", 0) == []
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
