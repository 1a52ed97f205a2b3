"""The benchmarks' phase log: what a served model writes per call, and the summary bench_triton makes of it."""

from __future__ import annotations

import time

from acestep_triton.phase_log import PHASE_LOG_ENV, PhaseLog
from benchmarks.bench_triton import phase_summary


def test_phases_are_written_per_call_only_when_asked_and_summarised_per_model(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(PHASE_LOG_ENV, raising=False)
    silent = PhaseLog("dit_step")
    silent.mark("run")
    silent.write(rows=1)
    assert silent.file is None and list(tmp_path.iterdir()) == []

    monkeypatch.setenv(PHASE_LOG_ENV, str(tmp_path))
    log = PhaseLog("dit_step")
    since = time.time()
    for rows, pause in ((2, 0.002), (1, 0.004), (2, 0.006)):
        time.sleep(pause)
        log.mark("inputs")
        log.mark("run")
        log.write(rows=rows)
    summary = phase_summary(tmp_path, since, time.time())["dit_step"]
    assert summary["calls"] == 3 and summary["rows_median"] == 2
    assert 3.5 <= summary["ms_median"]["inputs"] < 50 and summary["ms_median"]["run"] < summary["ms_median"]["inputs"]
    assert phase_summary(tmp_path, time.time() + 1, time.time() + 2) == {}
