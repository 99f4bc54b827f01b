"""The benchmark's count of Redis commands (bench/redis_commands.py), on a real Redis."""

from __future__ import annotations

from django.conf import settings

from bench.redis_commands import Snapshot, delta, snapshot

# Two commands inside the script, as toot's scripts call TIME and write.
SCRIPT = "redis.call('TIME'); return redis.call('INCR', KEYS[1])"


def test_a_snapshot_counts_commands_by_name_a_scripts_own_too(redis):
    key = f"{settings.TOOT['KEY_PREFIX']}bench:counted"
    script = redis.register_script(SCRIPT)
    script(keys=[key])  # loaded: later calls are EVALSHA alone
    before = snapshot(redis)
    for _ in range(20):
        redis.rpush(key + ":list", "x")
        script(keys=[key])
    after = snapshot(redis)

    counted = delta(before, after, events=10, deliveries=20, polls=0, receipts=0)
    # At least: the suite's Redis may serve a worker of an earlier test too.
    assert counted["calls"]["rpush"] >= 20
    assert counted["calls"]["evalsha"] >= 20
    assert counted["calls"]["time"] >= 20
    assert counted["calls"]["incr"] >= 20
    assert "info" not in counted["calls"]
    assert counted["calls_total"] >= 80
    assert counted["calls_per_event"] == counted["calls_total"] / 10
    assert counted["calls_per_delivery"] == counted["calls_total"] / 20
    assert counted["cpu_ms"] >= 0
    assert after.cpu_seconds >= before.cpu_seconds


def test_the_benchmarks_own_commands_are_taken_out():
    before = Snapshot({"evalsha": 10, "llen": 5, "rpush": 1, "info": 3}, cpu_seconds=1.0)
    after = Snapshot(
        {"evalsha": 40, "llen": 105, "rpush": 31, "info": 9, "brpop": 4}, cpu_seconds=1.003
    )

    counted = delta(before, after, events=10, deliveries=20, polls=90, receipts=20)

    # llen: 100, of which 90 polls; rpush: 30, of which 20 receipts; info is the benchmark's.
    assert counted["calls"] == {"evalsha": 30, "llen": 10, "rpush": 10, "brpop": 4}
    assert list(counted["calls"]) == ["evalsha", "llen", "rpush", "brpop"]  # most first
    assert counted["calls_total"] == 54
    assert counted["by_command_per_event"]["evalsha"] == 3.0
    assert counted["by_command_per_delivery"]["brpop"] == 0.2
    assert round(counted["cpu_ms"], 6) == 3.0
    assert round(counted["cpu_ms_per_delivery"], 6) == 0.15
    assert round(counted["cpu_us_per_call"], 3) == round(3000 / 54, 3)
    assert counted["excluded"] == {"llen (receipt polls)": 90, "rpush (handler receipts)": 20}


def test_no_calls_no_cost_per_call():
    same = Snapshot({"llen": 3}, cpu_seconds=2.0)
    counted = delta(same, Snapshot({"llen": 5}, 2.0), events=1, deliveries=1, polls=2, receipts=0)
    assert counted["calls"] == {}
    assert counted["cpu_us_per_call"] is None
