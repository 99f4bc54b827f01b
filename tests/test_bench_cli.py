"""The benchmark run as its users run it (python -m bench), small: two Celery workers per
side, and the Redis commands of each burst counted against its own Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from devtools.processes import ROOT

ARGS = ["--skip-limits", "--skip-paced", "--modes", "single", "--copies", "1,2", "--events", "30"]


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(workers, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--workers", workers])
    assert exited.value.code == 2
    assert "--workers" in capsys.readouterr().err


# Real processes for most of a minute, more on a loaded machine; no database of the
# suite's in it (the benchmark's projects have SQLite files of their own).
@pytest.mark.processes
def test_two_workers_per_side_and_the_redis_commands_of_each_burst_and_side(tmp_path):
    # The benchmark's own embedded Redis, not the suite's: its counts are then its own.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TOOT_REDIS_URL", "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL")
    }
    result = subprocess.run(
        [
            *[sys.executable, "-m", "bench", "--workers", "2", "--redis-sides", *ARGS],
            *["--output-dir", str(tmp_path)],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = re.search(r"^Logs of every process: (.+)$", result.stdout, re.M)
    try:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        # Redis, gunicorn for each side, and two workers for each.
        assert "Stopping 7 processes" in result.stdout
        assert logs is not None
        for role in ("publisher", "subscriber"):
            assert (Path(logs[1]) / f"{role}-worker.log").exists()
            assert (Path(logs[1]) / f"{role}-worker-2.log").exists()
        assert "2 Celery worker(s) per side, prefork concurrency 2 each" in result.stdout
        assert "Redis calls per event / per delivery, by command" in result.stdout

        [path] = tmp_path.glob("*.json")
        results = json.loads(path.read_text())
        assert results["meta"]["options"]["workers"] == 2
        bursts = {burst["copies"]: burst for burst in results["bursts"]}
        assert sorted(bursts) == [1, 2]
        for copies, burst in bursts.items():
            assert burst["tally"]["lost"] == burst["tally"]["duplicated"] == 0
            # The two workers of a side are one row, as one worker's would be.
            assert {"publisher-worker", "subscriber-worker"} <= set(burst["cpu_ms_per_delivery"])
            assert not any(name.endswith("-2") for name in burst["cpu_ms_per_delivery"])
            redis = burst["redis"]
            # toot's scripts, and each delivery's handler mark; not the benchmark's INFO.
            assert redis["calls"]["evalsha"] >= burst["events"]
            assert "info" not in redis["calls"]
            assert redis["calls_per_event"] == redis["calls_total"] / burst["events"]
            assert redis["calls_per_delivery"] == redis["calls_total"] / (30 * copies)
            per_delivery = redis["by_command_per_delivery"]
            assert per_delivery["evalsha"] == redis["calls"]["evalsha"] / (30 * copies)
            assert redis["excluded"]["rpush (handler receipts)"] == 30 * copies
            assert redis["cpu_ms"] > 0
        # MONITOR's reader ran beside them all, and told the two sides apart.
        sides = results["redis_sides"]
        assert sides["publisher"]["by_command"]["evalsha"] > 0
        assert sides["subscriber"]["by_command"]["evalsha"] > 0
        assert sides["benchmark"]["by_command"]["rpush"] >= 90  # the receipts, 30 + 60
        assert "Redis calls by whose keys they touch" in result.stdout
        # Each of M URLs gets its own sends and handler runs: more calls per event.
        assert bursts[2]["redis"]["calls_per_event"] > bursts[1]["redis"]["calls_per_event"]
    finally:
        if logs is not None:
            shutil.rmtree(logs[1], ignore_errors=True)
