"""The results as a table, as JSON, and as a PNG chart when matplotlib is installed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROCESS_ORDER = (
    "driver (publish)",
    "publisher-web",
    "publisher-worker",
    "subscriber-web",
    "subscriber-worker",
    "redis",
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    meta = results["meta"]
    options = meta["options"]
    lines.append(
        f"toot benchmark {meta['started']}  run {meta['run_id']}  {meta['cpus']} cores  "
        f"Python {meta['python']}  Django {meta['django']}  Celery {meta['celery']}  "
        f"redis-py {meta['redis_py']}  toot {meta['toot']}  commit {meta['commit']}"
    )
    lines.append(
        f"topology: Redis {meta['redis']}; gunicorn gthread {options['web_workers']} workers x "
        f"{options['web_threads']} threads per side; "
        f"{options.get('workers', 1)} Celery worker(s) per side, prefork concurrency "
        f"{options['concurrency']} each; deliveries "
        f"{'signed, subscribing takes a token' if options['signed'] else 'unsigned'}; "
        f"{'metrics on (multiprocess); ' if options.get('metrics') else ''}"
        f"{'tracing on (spans dropped); ' if options.get('tracing') else ''}"
        "processes log at WARNING"
    )

    load = meta.get("loadavg")
    if load:
        lines.append(
            f"load average (1 min) at start {load['start']:.2f}, at end {load.get('end', 0):.2f}: "
            "other work on this machine lowers every figure; read them against the limits "
            "measured in the same run"
        )
    limits = results.get("limits") or {}
    if limits:
        lines.append("")
        lines.append("Limits of this machine, same run")
        steady = limits.get("steadiness")
        if steady:
            lines.append(
                f"  CPU steadiness, a spinner on each of {steady['cores']} cores for "
                f"{steady['seconds']:g}s: speed per {steady['window_ms']:.0f} ms window, against "
                f"the fastest, median {steady['median']:.0%}, 5th percentile {steady['p5']:.0%}, "
                f"slowest {steady['slowest']:.0%}; {steady['under_half']:.0%} of windows under "
                "half speed"
            )
        noop = limits.get("celery_noop")
        if noop:
            lines.append(
                f"  Celery no-op task, consumed by one worker (prefork {noop['concurrency']}), "
                f"same broker: {noop['tasks_per_s']:,.0f} tasks/s  ({noop['tasks']} tasks; "
                f"worker CPU {noop['worker_cpu_ms_per_task']:.2f} ms/task)"
            )
        post = limits.get("post")
        if post:
            lines.append(
                f"  POST to the subscriber's gunicorn (trivial view), one requests.Session: "
                f"{post['requests_per_s']:,.0f} requests/s  ({post['requests']} in "
                f"{post['seconds']:.1f}s; CPU per request: server "
                f"{post['server_cpu_ms_per_request']:.2f} ms, client "
                f"{post['client_cpu_ms_per_request']:.2f} ms)"
            )
        if limits.get("paced"):
            lines.append(
                "  At each paced rate, that POST and a Redis round trip of toot's client: "
                "the paced table's last columns"
            )

    bursts = results.get("bursts") or []
    noop_rate = (limits.get("celery_noop") or {}).get("tasks_per_s")
    post_rate = (limits.get("post") or {}).get("requests_per_s")
    if bursts:
        lines.append("")
        lines.append("Burst: N events published as fast as possible, to M callback URLs")
        lines.append(
            "  mode    M      N  deliveries  seconds  deliv/s  /noop  /POST  lost  dup"
            "  publish() p50  p99 ms  others"
        )
        for burst in bursts:
            tally = burst["tally"]
            lines.append(
                f"  {burst['mode']:<6} {burst['copies']:>2} {burst['events']:>6} "
                f"{burst['deliveries']:>11} {burst['seconds']:>8.2f} "
                f"{burst['deliveries_per_s']:>8,.0f} "
                f"{_ratio(burst['deliveries_per_s'], noop_rate):>6} "
                f"{_ratio(burst['deliveries_per_s'], post_rate):>6} "
                f"{tally['lost']:>5} {tally['duplicated']:>4}"
                f"  {_num(burst['publish_ms']['p50'], 2):>13}"
                f" {_num(burst['publish_ms']['p99'], 2):>5}"
                f"  {burst['other_cores']:>6.2f}" + ("" if burst["complete"] else "  INCOMPLETE")
            )
        lines.append(
            "  /noop, /POST: deliveries/s over the limits above; others: cores busy with "
            "processes outside the benchmark"
        )
        lines.append("")
        lines.append("CPU milliseconds per delivery, by process tree (during each burst)")
        names = [name for name in PROCESS_ORDER if name in bursts[0]["cpu_ms_per_delivery"]]
        header = (
            "  "
            + f"{'':<20}"
            + "".join(f"{burst['mode'] + ' M=' + str(burst['copies']):>14}" for burst in bursts)
        )
        lines.append(header + f"{'peak RSS MiB':>14}")
        peaks = results.get("peak_rss_mib", {})
        for name in [*names, "total"]:
            cells = "".join(f"{_cpu(burst['cpu_ms_per_delivery'], name):>14}" for burst in bursts)
            peak = peaks.get(name)
            lines.append(f"  {name:<20}{cells}{_num(peak, 0) if peak else '':>14}")
        lines.append(
            "  driver (publish): this process calling toot.publish(), as a view of the "
            "publisher would;"
        )
        lines.append(
            "  publisher-web only serves subscriptions. Trees: each gunicorn or Celery worker "
            "with its children."
        )
        if options.get("workers", 1) > 1:
            lines.append(
                f"  A side's {options['workers']} Celery workers are summed in its -worker row."
            )
        lines += _redis_table(bursts, results.get("redis_idle") or {})

    lines += _sides_lines(results.get("redis_sides"))

    paced = results.get("paced") or []
    if paced:
        lines.append("")
        lines.append("Paced: latency from publish() to the handler, M=1")
        lines.append(
            "  mode   rate/s  events  achieved/s  p50 ms  p95 ms  p99 ms  max ms  lost  dup"
            "  publish() p50  p99 ms   POST p50  p99   Redis p50"
        )
        floors = {floor["rate"]: floor for floor in limits.get("paced", [])}
        for run in paced:
            latency, tally = run["latency_ms"], run["tally"]
            floor = floors.get(run["rate"])
            lines.append(
                f"  {run['mode']:<6} {run['rate']:>6g} {run['events']:>7} "
                f"{run['achieved_rate']:>11.1f} {_num(latency['p50']):>7} "
                f"{_num(latency['p95']):>7} "
                f"{_num(latency['p99']):>7} {_num(latency['max']):>7} {tally['lost']:>5} "
                f"{tally['duplicated']:>4}  {_num(run['publish_ms']['p50'], 2):>13} "
                f"{_num(run['publish_ms']['p99'], 2):>5}"
                + (
                    f"  {_num(floor['post_ms']['p50']):>9} {_num(floor['post_ms']['p99']):>4}"
                    f"  {_num(floor['redis_ms']['p50'], 2):>10}"
                    if floor
                    else ""
                )
            )
        if floors:
            lines.append(
                "  POST, Redis: the same run's plain POST (ms, p50 and p99) and Redis round trip "
                "at that pace"
            )

    lines += _slow_table(results.get("slow"))

    memory = results.get("memory")
    if memory:
        lines.append("")
        lines.append(
            f"Memory: RSS (MiB, process tree) after {memory['checkpoint']:,} and after "
            f"{memory['events']:,} events (M=1); lost {memory['lost']}, duplicated "
            f"{memory['duplicated']}"
        )
        first = memory["rss_mib"][str(memory["checkpoint"])]
        last = memory["rss_mib"][str(memory["events"])]
        for name in first:
            growth = memory["growth_pct"][name]
            verdict = ""
            if name.endswith("-worker"):  # the target: within 10 %
                verdict = "  flat (within 10 %)" if abs(growth) <= 10 else "  GROWS (over 10 %)"
            lines.append(
                f"  {name:<20}{first[name]:>10.1f}{last[name]:>10.1f}{growth:>+9.1f} %{verdict}"
            )
        used = memory["redis_used_memory_mib"]
        lines.append(
            f"  Redis used_memory {used[str(memory['checkpoint'])]:.1f} -> "
            f"{used[str(memory['events'])]:.1f} MiB: "
            f"{memory['redis_bytes_per_event']:.0f} bytes per event kept (toot's dedupe keys "
            "live DEDUPE_TTL, 3 days)"
        )

    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return lines


def _slow_table(section: dict[str, Any] | None) -> list[str]:
    """The runs with slow callback URLs beside the measured subscriber (--slow)."""
    if not section:
        return []
    lines = ["", f"Slow callback URLs beside the measured subscriber (--slow {section['spec']})"]
    answers = ", ".join(
        _path(url["url"])
        + (" never answers" if url["answers"] == "silent" else f" answers after {url['answers']}")
        for url in section["urls"]
    )
    lines.append(f"  on the measured channel too: {answers}")
    publisher = section.get("publisher") or {}
    if publisher:
        lines.append(
            f"  publisher: READ_TIMEOUT {publisher['read_timeout']:g}s; at most "
            f"{publisher['in_flight']} requests in flight per callback URL (MAX_IN_FLIGHT), "
            f"SENDERS {publisher['senders']} sender threads per worker process"
        )
    runs = section.get("runs") or []
    bursts = [run for run in runs if run["kind"] == "burst"]
    if bursts:
        lines.append("  Burst: the measured subscriber's deliveries/s, without and with them")
        lines.append("  mode    M      N   without  with slow  with/without  lost  dup")
        for run in bursts:
            burst, without = run["with"], run["without"] or {}
            lines.append(
                f"  {run['mode']:<6} {run['copies']:>2} {run['events']:>6} "
                f"{_num(without.get('deliveries_per_s')):>9} {burst['deliveries_per_s']:>10,.1f} "
                f"{_num(run['ratio'], 2):>13} {burst['tally']['lost']:>5} "
                f"{burst['tally']['duplicated']:>4}" + ("" if burst["complete"] else "  INCOMPLETE")
            )
        if any(run["without"] for run in bursts):
            lines.append("  the target of issue 15: with/without at least 0.80")
    paced = [run for run in runs if run["kind"] == "paced"]
    if paced:
        lines.append(
            "  Paced: latency from publish() to the measured subscriber's handler, ms, "
            "without and with them"
        )
        lines.append(
            "  mode   rate/s  events   without p50     p95     p99   with p50      p95      p99"
            "      max  lost  dup"
        )
        for run in paced:
            latency, tally = run["with"]["latency_ms"], run["with"]["tally"]
            before = (run["without"] or {}).get("latency_ms") or {}
            lines.append(
                f"  {run['mode']:<6} {run['rate']:>6g} {run['events']:>7} "
                f"{_num(before.get('p50')):>13} {_num(before.get('p95')):>7} "
                f"{_num(before.get('p99')):>7} {_num(latency['p50']):>10} "
                f"{_num(latency['p95']):>8} {_num(latency['p99']):>8} {_num(latency['max']):>8} "
                f"{tally['lost']:>5} {tally['duplicated']:>4}"
            )
    if runs:
        lines.append(
            "  The slow URLs after each run: of the events published, those answered 200 and "
            "those the publisher gave up on (dead letters)"
        )
        lines.append(
            "  run                 url      answers  published  answered  dead  requests  "
            "batches  most held  hung up"
        )
        for run in runs:
            name = f"{run['kind']} {run['mode']} " + (
                f"M={run['copies']}" if run["kind"] == "burst" else f"{run['rate']:g}/s"
            )
            settled = run["slow_urls"]
            for url in settled["urls"]:
                lines.append(
                    f"  {name:<19} {_path(url['url']):<8} {url['answers']:>7} "
                    f"{url['expected']:>10} {url['expected_answered']:>9} "
                    f"{url['dead_lettered']:>5} {url['requests']:>9} {url['batches']:>8} "
                    f"{url['max_in_flight']:>10} {url['hung_up']:>8}"
                )
                name = ""
            lines.append(
                f"  {'':<19} all in within {settled['waited_s']:.1f}s"
                if settled["settled"]
                else f"  {'':<19} NOT ALL IN after {settled['waited_s']:.1f}s (--slow-wait)"
            )
        lines.append(
            "  most held: requests the URL held at once; hung up: requests the publisher gave "
            "up on (READ_TIMEOUT) before the answer"
        )
    return lines


def _sides_lines(sides: dict[str, Any] | None) -> list[str]:
    """Whose keys Redis's calls touched, over the whole run (--redis-sides)."""
    if not sides:
        return []
    shares = ", ".join(
        f"{side} {value['share']:.1%}"
        for side, value in sides.items()
        if side != "benchmark" and value["calls"]
    )
    return [
        "",
        "Redis calls by whose keys they touch, over the whole run (--redis-sides, MONITOR): "
        + shares,
        f"  not counted: the benchmark's own {sides['benchmark']['calls']:,} (receipts, the "
        "no-op tasks of the limits)",
    ]


REDIS_ROWS = 12  # commands shown by name; the rest are summed under "other"


def _redis_table(bursts: list[dict[str, Any]], idle: dict[str, dict[str, Any]]) -> list[str]:
    """Redis's calls by command per event and per delivery, and its CPU, in each burst; and
    the share of them Redis would have run in as long with no event (``idle``, by mode)."""
    bursts = [burst for burst in bursts if burst.get("redis")]
    if not bursts:
        return []
    totals: dict[str, float] = {}
    for burst in bursts:
        for name, calls in burst["redis"]["calls"].items():
            totals[name] = totals.get(name, 0.0) + calls / burst["deliveries"]
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    shown, other = ranked[:REDIS_ROWS], ranked[REDIS_ROWS:]
    width = 17
    lines = [
        "",
        "Redis calls per event / per delivery, by command (during each burst; the "
        "benchmark's own taken out)",
        "  "
        + f"{'':<20}"
        + "".join(f"{burst['mode'] + ' M=' + str(burst['copies']):>{width}}" for burst in bursts),
    ]

    def row(label: str, values: list[tuple[float, float] | None], digits: int = 2) -> None:
        cells = "".join(
            f"{'-' if value is None else f'{value[0]:.{digits}f} / {value[1]:.{digits}f}':>{width}}"
            for value in values
        )
        lines.append(f"  {label:<20}{cells}")

    def per(burst: dict[str, Any], calls: float) -> tuple[float, float]:
        return calls / burst["events"], calls / burst["deliveries"]

    for name in shown:
        row(name, [per(b, b["redis"]["calls"].get(name, 0)) for b in bursts])
    if other:
        row(
            f"other ({len(other)})",
            [per(b, sum(b["redis"]["calls"].get(name, 0) for name in other)) for b in bursts],
        )
    row("all calls", [per(b, b["redis"]["calls_total"]) for b in bursts])
    row("Redis CPU, ms", [per(b, b["redis"]["cpu_ms"]) for b in bursts], 3)
    lines.append(
        "  "
        + f"{'Redis CPU us/call':<20}"
        + "".join(f"{_num(b['redis']['cpu_us_per_call'], 2):>{width}}" for b in bursts)
    )
    if any(b["mode"] in idle for b in bursts):

        def idle_share(burst: dict[str, Any]) -> str:
            quiet = idle.get(burst["mode"])
            if not quiet or not burst["redis"]["calls_total"]:
                return "-"
            share = quiet["calls_per_s"] * burst["seconds"] / burst["redis"]["calls_total"]
            return f"{share:.0%}"

        lines.append(
            "  "
            + f"{'idle share of calls':<20}"
            + "".join(f"{idle_share(b):>{width}}" for b in bursts)
        )
        for mode, quiet in idle.items():
            lines.append(
                f"  idle, {mode}: {quiet['calls_per_s']:,.0f} calls/s and "
                f"{quiet['cpu_ms_per_s']:.1f} ms of Redis CPU a second with no event (the "
                "workers' polls; in the counts above over each burst's seconds)"
            )
    lines.append(
        "  calls as INFO commandstats counts them: a script's EVALSHA and each command it "
        "calls; Redis CPU: INFO cpu, sys + user"
    )
    lines.append(
        "  taken out: the benchmark's LLEN polls of the receipts, the example handler's RPUSH "
        "of one, the INFOs; Celery's broker commands are in"
    )
    return lines


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[-1]


def _ratio(value: float, limit: float | None) -> str:
    return "-" if not limit else f"{value / limit:.2f}"


def _cpu(cpu: dict[str, float], name: str) -> str:
    if name == "total":
        return f"{sum(cpu.values()):.2f}"
    return "-" if name not in cpu else f"{cpu[name]:.2f}"


def mode_lines(results: dict[str, Any]) -> list[str]:
    """One ``mode=<m> M=<m> deliveries_per_s=<x>`` line for each mode and M."""
    lines = []
    for entry in results.get("modes", []):
        if entry.get("deliveries_per_s") is None:
            lines.append(
                f"mode={entry['mode']} M={entry['copies']} deliveries_per_s=n/a "
                f"not available: {entry['reason']}"
            )
        else:
            lines.append(
                f"mode={entry['mode']} M={entry['copies']} "
                f"deliveries_per_s={entry['deliveries_per_s']:.1f}"
            )
    section = results.get("slow") or {}
    for run in section.get("runs", []):
        if run["kind"] == "burst":
            line = (
                f"mode={run['mode']} M={run['copies']} slow={section['spec']} "
                f"deliveries_per_s={run['with']['deliveries_per_s']:.1f}"
            )
            if run["ratio"] is not None:
                line += (
                    f" without={run['without']['deliveries_per_s']:.1f} ratio={run['ratio']:.2f}"
                )
            lines.append(line)
    return lines


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Draw the PNG, a panel for each part that ran; returns why not if there is none, or if
    matplotlib is missing (pip install toot[bench-chart])."""
    panels = [
        draw
        for draw, ran in (
            (_paced_panel, any(run["latencies_ms"] for _, run in _paced_runs(results))),
            (_throughput_panel, bool(_bars(results))),
            (_progress_panel, any(burst["progress"] for _, burst in _burst_runs(results))),
        )
        if ran
    ]
    if not panels:
        return "no chart: no burst or paced run to draw"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[bench-chart]')"

    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels), 5.2), squeeze=False)
    meta = results["meta"]
    # The title wraps on one panel: it is as long as three panels are wide.
    title = f"toot benchmark {meta['started']} ({meta['cpus']} cores, commit {meta['commit']})"
    fig.suptitle(title if len(panels) > 1 else title.replace(" (", "\n("))
    for draw, ax in zip(panels, axes[0], strict=True):
        draw(results, ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _paced_runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The paced runs, and those with slow URLs beside (--slow), each with its label."""
    runs = [(f"{run['mode']} {run['rate']:g}/s", run) for run in results.get("paced", [])]
    section = results.get("slow") or {}
    for run in section.get("runs", []):
        if run["kind"] == "paced":
            paced = run["with"]
            runs.append((f"{paced['mode']} {paced['rate']:g}/s, slow {section['spec']}", paced))
    return runs


def _paced_panel(results: dict[str, Any], ax: Any) -> None:
    for label, run in _paced_runs(results):
        values = run["latencies_ms"]
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("publish() to handler, ms (log)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Paced latency (CDF), M=1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput bars: each mode and M, and each burst with slow URLs beside (--slow)."""
    bars = [{**entry, "label": ""} for entry in results.get("modes", [])]
    section = results.get("slow") or {}
    for run in section.get("runs", []):
        if run["kind"] == "burst":
            burst = run["with"]
            bars.append(
                {
                    "mode": burst["mode"],
                    "copies": burst["copies"],
                    "deliveries_per_s": burst["deliveries_per_s"],
                    "label": f"\nslow {section['spec']}",
                }
            )
    return bars


def _burst_runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The bursts, and those with slow URLs beside (--slow), each with its label."""
    runs = [
        (f"{burst['mode']} M={burst['copies']} N={burst['events']}", burst)
        for burst in results.get("bursts", [])
    ]
    section = results.get("slow") or {}
    for run in section.get("runs", []):
        if run["kind"] == "burst":
            burst = run["with"]
            label = f"{burst['mode']} M={burst['copies']} N={burst['events']}"
            runs.append((f"{label}, slow {section['spec']}", burst))
    return runs


def _throughput_panel(results: dict[str, Any], ax: Any) -> None:
    modes = _bars(results)
    labels = [f"{entry['mode']}\nM={entry['copies']}{entry['label']}" for entry in modes]
    rates = [entry.get("deliveries_per_s") or 0.0 for entry in modes]
    bars = ax.bar(labels, rates, color="tab:blue")
    for bar, entry in zip(bars, modes, strict=True):
        text = "n/a" if entry.get("deliveries_per_s") is None else f"{bar.get_height():.0f}"
        ax.annotate(
            text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    limits = results.get("limits") or {}
    if limits.get("celery_noop"):
        ax.axhline(
            limits["celery_noop"]["tasks_per_s"],
            color="tab:red",
            linestyle="--",
            label="Celery no-op tasks/s",
        )
    if limits.get("post"):
        ax.axhline(
            limits["post"]["requests_per_s"],
            color="tab:green",
            linestyle=":",
            label="POST requests/s (1 client)",
        )
    ax.set_ylabel("deliveries/s")
    ax.set_title("Burst throughput")
    if limits.get("celery_noop") or limits.get("post"):
        ax.legend(loc="upper left")


def _progress_panel(results: dict[str, Any], ax: Any) -> None:
    for label, burst in _burst_runs(results):
        if burst["progress"]:
            xs = [point[0] for point in burst["progress"]]
            ys = [point[1] for point in burst["progress"]]
            ax.plot(xs, ys, label=label)
    ax.set_xlabel("seconds since the first publish()")
    ax.set_ylabel("handler runs recorded")
    ax.set_title("Burst progress")
    ax.grid(True, alpha=0.3)
    ax.legend()
