"""The capacity model (bench/capacity.py) over a benchmark's figures."""

from __future__ import annotations

import json

import pytest

from bench.capacity import figures, main, plan


def burst(mode="single", copies=1, worker=2.0, web=1.0, handler=1.5, redis_cpu=0.5, calls=30.0):
    return {
        "mode": mode,
        "copies": copies,
        "complete": True,
        "cpu_ms_per_delivery": {
            "driver (publish)": 0.3 / copies,  # per event 0.3 ms, shared by M deliveries
            "publisher-web": 0.0,
            "publisher-worker": worker,
            "subscriber-web": web,
            "subscriber-worker": handler,
            "redis": redis_cpu,
        },
        "redis": {"calls_per_delivery": calls, "cpu_ms_per_delivery": redis_cpu},
    }


def test_the_median_of_each_figure_over_the_runs():
    runs = [
        {"bursts": [burst(worker=1.0), burst("batch", 10, worker=0.2)]},
        {"bursts": [burst(worker=3.0)]},
        {"bursts": [burst(worker=2.5), {**burst(worker=99.0), "complete": False}]},
        {"bursts": [{key: value for key, value in burst().items() if key != "redis"}]},
    ]
    measured = figures(runs)
    assert list(measured) == [("batch", 10), ("single", 1)]
    assert measured[("single", 1)]["publisher workers"] == 2.5
    assert measured[("batch", 10)]["publish() per event"] == pytest.approx(0.3)


def test_processes_are_cores_at_the_utilisation_and_redis_is_one_core_each():
    measured = figures([{"bursts": [burst(copies=10)]}])[("single", 10)]
    need = plan(measured, 1_000, 10, 0.7)
    assert need["deliveries"] == 10_000
    # 10,000 deliveries x 2 ms = 20 cores busy; at 70 % each, 29.
    assert need["processes"] == {
        "publisher workers": 29,
        "subscriber web": 15,
        "subscriber workers": 22,
    }
    assert need["caller_cores"] == pytest.approx(1_000 * 0.3 / 1000 / 0.7)
    assert need["redis_calls"] == 300_000
    assert need["redis_core_share"] == pytest.approx(5.0)  # 10,000 x 0.5 ms
    assert need["redis_servers"] == 8


def test_the_command_prints_both_tables(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"bursts": [burst(), burst("batch", 10, redis_cpu=0.05)]}))
    assert main([str(path), "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "deliveries/s per Redis core" in out
    assert "  single  1    100,000       100,000" in out
    assert "Redis at 50% carry them" in out


def test_results_with_no_redis_counts_say_so(tmp_path, capsys):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"bursts": []}))
    main([str(path)])
    assert "no complete burst with Redis counts" in capsys.readouterr().out


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_the_utilisation_is_a_share_of_a_core(tmp_path, share):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "any.json"), "--utilisation", share])
