"""Retention: old outputs, uploads and finished jobs go; fresh, referenced, served and hidden files stay.

Runs the real Retention, JobManager and SQLite store on a temporary outputs directory; no
generation is needed (jobs are put into the store in the states under test), so no server starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway import OutputStore, Settings
from gateway.engine import TritonEngine
from gateway.health import HealthMonitor
from gateway.jobs import JobManager
from gateway.jobstore import Job, JobState, SQLiteJobStore
from gateway.retention import Retention
from gateway.uploads import SourceFiles, UploadStore

DAY = 24 * 3600.0


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def job(job_id: str, state: JobState, output_name: str, finished_s_ago: float | None = None, **request) -> Job:
    now = time.time()
    return Job(
        id=job_id,
        state=state,
        request={"actual_seeds": [1, 2]} | request,
        output_name=output_name,
        created_at=now - 3 * DAY,
        finished_at=None if finished_s_ago is None else now - finished_s_ago,
    )


@pytest.fixture
def retention(tmp_path):
    settings = Settings(checkpoint_path="/ckpt", outputs_dir=tmp_path, retention_s=DAY, upload_retention_s=DAY / 4)
    outputs = OutputStore(tmp_path)
    uploads = UploadStore(settings.uploads_dir, settings.max_upload_bytes, settings.max_upload_s)
    store = SQLiteJobStore(tmp_path / ".jobs.sqlite3")
    engine = TritonEngine("127.0.0.1:1")
    manager = JobManager(settings, engine, outputs, store, SourceFiles(uploads, outputs), HealthMonitor(engine, 1.0, 10.0))
    yield Retention(settings, outputs, manager, uploads)
    store.close()


def test_old_files_go_and_fresh_ones_stay(retention):
    root = retention.outputs.root
    for name in ("old.wav", "old_input_params.json", "fresh.flac", ".jobs-note", ".tmp-123.part"):
        (root / name).write_bytes(b"x")
    for name in ("old.wav", "old_input_params.json", ".jobs-note", ".tmp-123.part"):
        age(root / name, 2 * DAY)
    assert sorted(retention.sweep()) == ["old.wav", "old_input_params.json"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".jobs.sqlite3")) == [
        ".jobs-note", ".tmp-123.part", ".uploads", "fresh.flac"
    ]


def test_files_of_queued_and_running_jobs_stay_however_old(retention):
    root = retention.outputs.root
    retention.jobs.store.create(job("q", JobState.QUEUED, "queued.wav"))
    retention.jobs.store.create(job("r", JobState.RUNNING, "running.mp3"))
    names = ["queued.wav", "queued_1.wav", "queued_input_params.json", "running.mp3", "running_1.mp3", "gone.wav"]
    for name in names:
        (root / name).write_bytes(b"x")
        age(root / name, 2 * DAY)
    assert retention.sweep() == ["gone.wav"]


def test_files_being_served_or_written_stay(retention):
    root = retention.outputs.root
    for name in ("served.wav", "writing.ogg"):
        (root / name).write_bytes(b"x")
        age(root / name, 2 * DAY)
    retention.serving_started("served.wav")
    retention.jobs.writing.add("writing.ogg")
    assert retention.sweep() == []
    retention.serving_finished("served.wav")
    retention.jobs.writing.clear()
    assert sorted(retention.sweep()) == ["served.wav", "writing.ogg"]


def test_finished_jobs_older_than_the_period_are_forgotten(retention):
    store = retention.jobs.store
    store.create(job("old", JobState.SUCCEEDED, "a.wav", finished_s_ago=2 * DAY))
    store.create(job("recent", JobState.FAILED, "b.wav", finished_s_ago=DAY / 2))
    store.create(job("waiting", JobState.QUEUED, "c.wav"))
    retention.sweep()
    assert store.get("old") is None and store.events_after("old", 0) == []
    assert store.get("recent") is not None and store.get("waiting") is not None


def test_old_uploads_go_on_their_own_schedule(retention):
    uploads, outputs = retention.jobs.sources.uploads.root, retention.outputs.root
    for directory, name, age_s in ((uploads, "upload_old.wav", DAY / 2), (uploads, "upload_new.flac", DAY / 8),
                                   (uploads, ".tmp-1.part", DAY), (outputs, "half_a_day.wav", DAY / 2)):
        (directory / name).write_bytes(b"x")
        age(directory / name, age_s)
    assert retention.sweep() == ["upload_old.wav"]
    assert sorted(p.name for p in uploads.iterdir()) == [".tmp-1.part", "upload_new.flac"]
    assert (outputs / "half_a_day.wav").exists()


def test_sources_of_queued_and_running_jobs_and_those_being_read_stay(retention):
    uploads, outputs = retention.jobs.sources.uploads.root, retention.outputs.root
    store = retention.jobs.store
    store.create(job("q", JobState.QUEUED, "q.wav", src_audio_path="upload_queued.wav"))
    store.create(job("r", JobState.RUNNING, "r.wav", ref_audio_input="earlier.wav"))  # an output as reference
    store.create(job("done", JobState.SUCCEEDED, "d.wav", finished_s_ago=60, src_audio_path="upload_done.wav"))
    retention.jobs.reading.add("upload_reading.ogg")
    for name in ("upload_queued.wav", "upload_done.wav", "upload_reading.ogg", "earlier.wav"):
        directory = outputs if name == "earlier.wav" else uploads
        (directory / name).write_bytes(b"x")
        age(directory / name, 2 * DAY)
    assert retention.sweep() == ["upload_done.wav"]
    retention.jobs.reading.clear()
    assert retention.sweep() == ["upload_reading.ogg"]
