"""CPU time and memory of a process and everything it started, from Linux's /proc."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available() -> bool:
    return (PROC / "self" / "stat").exists()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Field 2, the command, is in parentheses and may hold spaces: split after it.
    return text.rpartition(")")[2].split()


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])  # field 4, ppid
    return parents


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """user + system CPU of the process, of its live descendants and of the reaped ones.

    /proc counts a child that exited and was waited for in its parent's cutime/cstime, so
    a process that is replaced between two readings is still counted.
    """
    total = 0
    for member in tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            # Fields 14-17: utime, stime, cutime, cstime (clock ticks).
            total += sum(int(value) for value in fields[11:15])
    return total / TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_mib(pid: int) -> float:
    """Resident memory now, summed over the tree (pages shared after fork count in each)."""
    return sum(_status_kib(member, "VmRSS") for member in tree(pid)) / 1024


def peak_rss_mib(pid: int) -> float:
    """Each live process's peak resident memory (VmHWM), summed over the tree."""
    return sum(_status_kib(member, "VmHWM") for member in tree(pid)) / 1024


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, all processes) since boot."""
    fields = (PROC / "stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def own_cpu_seconds() -> float:
    """This process's CPU time, every thread."""
    times = os.times()
    return times.user + times.system
