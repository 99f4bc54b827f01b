"""Whose keys Redis's commands touch (bench/redis_sides.py), as MONITOR shows them."""

from __future__ import annotations

from bench.redis_sides import Tally

PREFIX = "toot-bench-abc"
FEED = [
    # (command as redis-py's Monitor gives it, whether a script ran it)
    (f"EVALSHA 1a2b 2 {PREFIX}:publisher:queue:{{out}}:ready x", False),
    ("TIME", True),  # no key: the script's side
    (f"RPUSH {PREFIX}:publisher:queue:{{out}}:ready x", True),
    (f"EVALSHA 3c4d 1 {PREFIX}:subscriber:queue:{{in}}:ready", False),
    ("TIME", True),
    ("GET x", True),
    (f"BRPOP {PREFIX}-publisher {PREFIX}-publisher\x06\x163 1", False),
    ("HSET unacked tag message", False),
    (f"RPUSH {PREFIX}:receipts {{}}", False),  # the example handler's receipt
    (f"LPUSH {PREFIX}-noop task", False),
    ("INFO commandstats", False),
    ("PING", False),
]


def test_each_command_goes_to_the_side_whose_keys_it_names():
    tally = Tally(PREFIX)
    for command, in_script in FEED:
        tally.add(command, in_script)
    result = tally.result()
    assert result["publisher"]["by_command"] == {"evalsha": 1, "time": 1, "rpush": 1}
    assert result["subscriber"]["by_command"] == {"evalsha": 1, "time": 1, "get": 1}
    assert result["broker"]["by_command"] == {"brpop": 1, "hset": 1}
    assert result["benchmark"]["by_command"] == {"rpush": 1, "lpush": 1}
    assert result["other"]["by_command"] == {"ping": 1}
    # Shares of what is not the benchmark's own; INFO is not counted at all.
    assert result["publisher"]["share"] == 3 / 9
    assert result["subscriber"]["share"] == 3 / 9
    assert sum(result[side]["share"] for side in result if side != "benchmark") == 1


def test_nothing_counted_no_shares():
    assert Tally(PREFIX).result()["publisher"] == {"calls": 0, "share": 0.0, "by_command": {}}
