"""The command line: what to run, in which order, and what to print and write."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench import procstat, report, slow, steadiness
from bench.measure import Burst, Driver, Paced, Published, batch_available, driver_peak_rss_mib
from bench.topology import BenchError, Options, Topology
from devtools.processes import ROOT, Process
from devtools.topology import TopologyError

MODES = ("single", "batch")
STEADINESS_SECONDS = 3.0
REDIS_IDLE_SECONDS = 2.0  # after each mode's warm-up: Redis's calls while no event comes
DESCRIPTION = """\
toot's end-to-end benchmark. Starts Redis (embedded unless $TOOT_REDIS_URL is set), the
example publisher and subscriber (gunicorn and --workers Celery workers each), subscribes
M callback URLs to one channel, and measures burst throughput, paced latency, the machine's limits
(how steady its CPUs are, Celery no-op task rate, plain POST rate and latency), CPU per
delivery by process, Redis commands and Redis CPU per event and per delivery, and peak
memory.
Prints a table, writes JSON (and with matplotlib a PNG chart of the bursts and paced
runs it ran) to --output-dir, and ends with one line per mode and M:
mode=<single|batch> M=<m> deliveries_per_s=<x>.
Exits 1 if any event was lost or delivered twice."""


def say(message: str = "") -> None:
    print(message, flush=True)


def positive_list(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> list[float] | list[int]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
        if not values or any(value <= 0 for value in values):
            raise argparse.ArgumentTypeError(f"values must be positive: {text!r}")
        return values

    return parse


def slow_spec(text: str) -> list[slow.Delay]:
    try:
        return slow.parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def modes(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [value for value in values if value not in MODES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}, not {text!r}")
    return list(dict.fromkeys(values))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to measure")
    what.add_argument(
        "--events",
        "-n",
        type=int,
        default=2000,
        metavar="N",
        help="events per burst (default 2000)",
    )
    what.add_argument(
        "--copies",
        "-m",
        type=positive_list(int),
        default=[1, 10],
        metavar="M,...",
        help="callback URLs subscribed to the channel, one burst each (default 1,10)",
    )
    what.add_argument(
        "--burst-budget",
        type=float,
        default=35.0,
        metavar="SECONDS",
        help="for M>1, lower N so that the burst takes about this long at the "
        "M=1 rate, and say so (default 35; 0: always N)",
    )
    what.add_argument(
        "--rates",
        type=positive_list(float),
        default=[20.0, 200.0],
        metavar="R,...",
        help="paced runs, events per second (default 20,200)",
    )
    what.add_argument(
        "--duration",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="length of each paced run (default 5)",
    )
    what.add_argument(
        "--modes",
        type=modes,
        default=list(MODES),
        metavar="MODE,...",
        help="delivery modes: single (one event per request) and batch "
        "(docs/protocol.md section 7); default single,batch",
    )
    what.add_argument("--skip-burst", action="store_true", help="no burst runs")
    what.add_argument("--skip-paced", action="store_true", help="no paced runs")
    what.add_argument(
        "--skip-limits",
        action="store_true",
        help="do not measure the machine's limits (CPU steadiness, Celery no-op task rate, "
        "plain POST rate, the paced floor)",
    )
    what.add_argument(
        "--limit-tasks",
        type=int,
        default=3000,
        metavar="N",
        help="no-op tasks for the Celery limit (default 3000)",
    )
    what.add_argument(
        "--limit-duration",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to POST for the request-rate limit (default 3)",
    )
    what.add_argument(
        "--memory",
        action="store_true",
        help="also the flat-memory check: publish --memory-events events (M=1) "
        "and compare RSS after 10%% of them and after all; not in the default run",
    )
    what.add_argument(
        "--memory-events",
        type=int,
        default=100_000,
        metavar="N",
        help="events for --memory (default 100000)",
    )

    beside = p.add_argument_group(
        "slow subscribers beside the measured one (issue 15)",
        # Wrapped here: the parser's formatter keeps descriptions as written.
        "More callback URLs on the measured channel, served by bench/slow.py, that answer\n"
        "late or never. With --slow, the burst and paced runs are measured with them\n"
        "subscribed; after each, the benchmark waits up to --slow-wait for them to get\n"
        "every event (not counted in the run's figures) and reports what each got.",
    )
    beside.add_argument(
        "--slow",
        type=slow_spec,
        metavar="SPEC",
        help="the slow URLs: <count>x<seconds>s answers 200 after that long, "
        "<count>xsilent never answers (the publisher hangs up after READ_TIMEOUT); "
        "comma-separated, e.g. 1x1s or 3x3s,1xsilent",
    )
    beside.add_argument(
        "--slow-compare",
        action="store_true",
        help="with --slow: run each burst and paced run first without the slow URLs, then "
        "with them, and report the ratio",
    )
    beside.add_argument(
        "--slow-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="after each run with the slow URLs, how long to wait at most for them to get "
        "every event, or for the publisher to give up (default 60)",
    )
    beside.add_argument(
        "--read-timeout",
        type=float,
        metavar="SECONDS",
        help="the publisher's READ_TIMEOUT: how long a delivery waits for an answer "
        "(default: toot's, 15)",
    )

    how = p.add_argument_group("the topology")
    how.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=2,
        help="Celery prefork processes per worker, publisher and subscriber "
        "alike, and of the no-op worker (default 2)",
    )
    how.add_argument(
        "--workers",
        "-w",
        type=int,
        default=1,
        metavar="N",
        help="Celery worker processes per side, each with its own node name (-n) and "
        "--concurrency children; their CPU and memory are summed per side (default 1)",
    )
    how.add_argument(
        "--web-workers", type=int, default=2, help="gunicorn worker processes per side (default 2)"
    )
    how.add_argument(
        "--web-threads",
        type=int,
        default=4,
        help="threads per gunicorn worker, gthread (default 4)",
    )
    how.add_argument(
        "--redis-sides",
        action="store_true",
        help="read Redis's MONITOR feed through the run (bench/redis_sides.py) and report "
        "the share of its calls on the publisher's, the subscriber's and the broker's keys; "
        "MONITOR costs Redis CPU, so Redis's figures are not those of a run without it",
    )
    how.add_argument(
        "--unsigned",
        action="store_true",
        help="send deliveries unsigned, as Ruby toot does (default: signed with a "
        "whsec_ secret and verified, as docs/security.md advises)",
    )
    how.add_argument(
        "--metrics",
        action="store_true",
        help='TOOT["METRICS"] on in both projects, prometheus_client in multiprocess mode '
        "(docs/metrics.md); default off",
    )
    how.add_argument(
        "--tracing",
        action="store_true",
        help='TOOT["TRACING"] on in every process, with the OpenTelemetry SDK and a batch '
        "span processor whose exporter drops the spans: toot's and the SDK's cost, not an "
        "exporter's (default: off)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--output-dir",
        type=Path,
        default=ROOT / "bench-results",
        help="where the JSON and the PNG go (default bench-results/)",
    )
    out.add_argument(
        "--stall",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up waiting for handler runs after this long without one (default 30)",
    )
    return p


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    import celery
    import django
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    import toot

    return {
        "django": django.get_version(),
        "celery": celery.__version__,
        "toot": toot.__version__,
        "redis_py": redis.__version__ + (" with hiredis" if HIREDIS_AVAILABLE else ""),
    }


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.copies = sorted(set(args.copies))
        options = Options(
            web_workers=args.web_workers,
            web_threads=args.web_threads,
            concurrency=args.concurrency,
            workers=args.workers,
            signed=not args.unsigned,
            tracing=args.tracing,
            copies=max(self.copies),
            read_timeout=args.read_timeout,
            metrics=args.metrics,
        )
        self.topology = Topology(options)
        self.driver = Driver(self.topology, say)
        self.slow = (
            slow.SlowCallbacks(args.slow, self.topology.log_dir) if args.slow is not None else None
        )
        self.started = dt.datetime.now(dt.timezone.utc)
        self.results: dict[str, Any] = {
            "meta": {
                "started": self.started.strftime("%Y-%m-%d %H:%M:%SZ"),
                "run_id": self.topology.run_id,
                "cpus": os.cpu_count(),
                "machine": platform.platform(),
                "python": platform.python_version(),
                "commit": git_commit(),
                "loadavg": {"start": os.getloadavg()[0]},
                "options": {
                    # read_timeout below, only when given: the default run's JSON stays as it was.
                    **{
                        k: v
                        for k, v in asdict(options).items()
                        if k not in ("read_timeout", "metrics")
                    },
                    "events": args.events,
                    "copies": self.copies,
                    "rates": args.rates,
                    "duration": args.duration,
                    **({"read_timeout": args.read_timeout} if args.read_timeout else {}),
                    **({"metrics": True} if args.metrics else {}),
                    **({"redis_sides": True} if args.redis_sides else {}),
                    **(
                        {
                            "slow": slow.describe(args.slow),
                            "slow_compare": args.slow_compare,
                            "slow_wait": args.slow_wait,
                        }
                        if args.slow
                        else {}
                    ),
                },
                **versions(),
            },
            "limits": {},
            "redis_idle": {},
            "bursts": [],
            "paced": [],
            "modes": [],
            "notes": [],
        }
        if self.slow is not None:
            self.results["slow"] = {
                "spec": slow.describe(args.slow),
                "urls": [
                    {"url": url, "answers": slow.describe_delay(delay)}
                    for url, delay in zip(self.slow.urls, args.slow, strict=True)
                ],
                "compare": args.slow_compare,
                "wait": args.slow_wait,
                "publisher": {},
                "runs": [],
            }
        self.clean = True
        self.mode_started = False
        self.sides: Process | None = None  # --redis-sides: bench/redis_sides.py

    def start_sides(self) -> None:
        topology = self.topology
        self.sides = Process(
            "redis-sides",
            [
                sys.executable,
                "-m",
                "bench.redis_sides",
                topology.redis_url,
                topology.prefix,
                str(topology.log_dir / "redis-sides.json"),
            ],
            {"PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            log_dir=topology.log_dir,
        ).start()
        self.sides.wait_for_log("monitoring")

    def stop_sides(self) -> None:
        """Stop the MONITOR reader; its counts go into the results."""
        if self.sides is None:
            return
        if not self.sides.running:
            raise BenchError(f"the MONITOR reader exited:\n{self.sides.log()[-3000:]}")
        self.sides.stop()
        self.sides = None
        path = self.topology.log_dir / "redis-sides.json"
        self.results["redis_sides"] = json.loads(path.read_text())

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        say(f"note: {text}")

    def run(self) -> None:
        args, topology = self.args, self.topology
        say(f"Logs of every process: {topology.log_dir}")
        topology.start_redis()
        self.results["meta"]["redis"] = (
            f"embedded ({topology.redis_url})"
            if topology.embedded_redis
            else "$TOOT_REDIS_URL (shared; not counted)"
        )
        say(f"Redis: {self.results['meta']['redis']}")
        if args.redis_sides:
            self.start_sides()
            say("Redis's MONITOR feed is read through the run (--redis-sides)")
        if self.slow is not None:
            self.slow.start()
            say(f"Slow callback URLs ({slow.describe(args.slow)}): {self.slow.url}/slow/<i>")
        for mode in args.modes:
            reason = batch_available() if mode == "batch" else None
            if reason is not None:
                say(f"mode={mode}: not available: {reason}")
                for copies in [] if args.skip_burst else self.copies:
                    self.results["modes"].append(
                        {"mode": mode, "copies": copies, "deliveries_per_s": None, "reason": reason}
                    )
                continue
            self.run_mode(mode)
        if args.memory:
            if not self.mode_started:
                self.start_mode("single")
            say(f"Memory check: {args.memory_events:,} events, M=1 ...")
            self.results["memory"] = memory = self.driver.memory(
                args.memory_events, chunk=1000, stall=args.stall
            )
            self.clean &= memory["lost"] == 0 and memory["duplicated"] == 0

    def start_mode(self, mode: str) -> None:
        workers = self.args.workers
        each = "Celery worker" if workers == 1 else f"{workers} Celery workers"
        say(f"Starting publisher and subscriber, mode={mode} (gunicorn + {each} each) ...")
        begun = time.monotonic()
        self.topology.start_apps(mode)
        if mode == "batch" and self.topology.setting("subscriber", "BATCH") != "True":
            raise BenchError(
                "the example subscriber's settings do not map $TOOT_BATCH to "
                'TOOT["BATCH"]: batch mode would run single'
            )
        if not self.mode_started:
            self.driver.setup_publisher()
        self.driver.set_mode(mode)
        self.mode_started = True
        self.topology.subscribe_copies(1)
        # Enough events that each worker's children take some before anything is timed.
        self.driver.warm_up(1, events=20 * self.args.workers)
        say(f"  up and warm in {time.monotonic() - begun:.1f}s")
        idle = self.driver.redis_idle(REDIS_IDLE_SECONDS)
        self.results["redis_idle"][mode] = idle
        say(
            f"  idle: Redis ran {idle['calls_per_s']:,.0f} calls/s, "
            f"{idle['cpu_ms_per_s']:.1f} ms of CPU a second"
        )

    def run_mode(self, mode: str) -> None:
        args, driver = self.args, self.driver
        self.start_mode(mode)
        if not args.skip_limits and not self.results["limits"]:
            say(f"Limits: CPU steadiness, a spinner on each core for {STEADINESS_SECONDS:g}s ...")
            steady = steadiness.measure(STEADINESS_SECONDS)
            say(
                f"  speed per {steady['window_ms']:.0f} ms window: median "
                f"{steady['median']:.0%}, slowest {steady['slowest']:.0%}"
            )
            say(f"Limits: Celery no-op tasks ({args.limit_tasks}) ...")
            noop = driver.celery_noop_rate(args.limit_tasks)
            say(f"  {noop['tasks_per_s']:,.0f} tasks/s")
            say(f"Limits: POST to the subscriber's gunicorn for {args.limit_duration:g}s ...")
            post = driver.post_rate(args.limit_duration)
            say(f"  {post['requests_per_s']:,.0f} requests/s")
            self.results["limits"] = {"steadiness": steady, "celery_noop": noop, "post": post}
            if not args.skip_paced:
                floors = []
                for rate in args.rates:
                    say(f"Limits: plain POST and Redis round trip at {rate:g}/s ...")
                    floor = driver.paced_floor(rate, args.duration)
                    say(
                        f"  POST p50 {floor['post_ms']['p50']:.1f} ms, "
                        f"p99 {floor['post_ms']['p99']:.1f} ms; "
                        f"Redis p50 {floor['redis_ms']['p50']:.2f} ms"
                    )
                    floors.append(floor)
                self.results["limits"]["paced"] = floors
        if not args.skip_burst:
            base_rate: float | None = None
            for copies in self.copies:
                events = self.events_for(copies, base_rate)
                self.topology.subscribe_copies(copies)
                if copies > 1:
                    driver.warm_up(copies, events=5)
                what = (
                    f"Burst mode={mode} M={copies}: {events} events, {events * copies} deliveries"
                )
                burst: Burst | None = None
                if self.slow is None or args.slow_compare:
                    say(f"{what} ...")
                    burst = self.burst(mode, copies, events)
                    self.results["bursts"].append(asdict(burst))
                    self.results["modes"].append(
                        {"mode": mode, "copies": copies, "deliveries_per_s": burst.deliveries_per_s}
                    )
                measured = burst.deliveries_per_s if burst is not None else None
                if self.slow is not None:
                    slowed = self.with_slow(
                        what, functools.partial(self.burst, mode, copies, events), burst
                    )
                    if measured is None and isinstance(slowed, Burst):
                        measured = slowed.deliveries_per_s
                if copies == 1:
                    base_rate = measured
            self.topology.subscribe_copies(1)
        if not args.skip_paced:
            for rate in args.rates:
                what = f"Paced mode={mode} M=1: {rate:g} events/s for {args.duration:g}s"
                paced: Paced | None = None
                if self.slow is None or args.slow_compare:
                    say(f"{what} ...")
                    paced = self.paced(mode, rate)
                    self.results["paced"].append(asdict(paced))
                if self.slow is not None:
                    self.with_slow(what, functools.partial(self.paced, mode, rate), paced)

    def burst(self, mode: str, copies: int, events: int, hook: Published | None = None) -> Burst:
        burst = self.driver.burst(mode, copies, events, self.args.stall, 1.0, hook)
        self.clean &= burst.tally["lost"] == 0 and burst.tally["duplicated"] == 0
        say(
            f"  {burst.deliveries_per_s:,.1f} deliveries/s in {burst.seconds:.1f}s "
            f"(lost {burst.tally['lost']}, duplicated {burst.tally['duplicated']})"
        )
        return burst

    def paced(self, mode: str, rate: float, hook: Published | None = None) -> Paced:
        paced = self.driver.paced(mode, rate, self.args.duration, self.args.stall, 0.5, hook)
        self.clean &= paced.tally["lost"] == 0 and paced.tally["duplicated"] == 0
        latency = paced.latency_ms
        say(
            f"  p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms"
            if latency["p50"] is not None and latency["p99"] is not None
            else "  no event arrived"
        )
        return paced

    # Slow URLs beside the measured subscriber (--slow)

    def with_slow(
        self,
        what: str,
        measure: Callable[[Published], Burst | Paced],
        without: Burst | Paced | None,
    ) -> Burst | Paced:
        """``measure`` with the slow URLs subscribed too; then, not timed, wait for their
        backlog, and unsubscribe them."""
        assert self.slow is not None
        callbacks, topology, spec = self.slow, self.topology, slow.describe(self.args.slow)
        section = self.results["slow"]
        if not section["publisher"]:
            section["publisher"] = self.driver.publisher_limits()
        topology.subscribe_slow(callbacks.urls)
        callbacks.reset()
        sent: set[str] = set()

        def published(ids: set[str]) -> None:
            sent.update(ids)
            callbacks.expect(sorted(ids))

        say(f"{what}, with the slow URLs {spec} ...")
        result = measure(published)
        entry: dict[str, Any] = {
            "kind": "burst" if isinstance(result, Burst) else "paced",
            "mode": result.mode,
            "copies": result.copies,
            "events": result.events,
            "rate": result.rate if isinstance(result, Paced) else None,
            "with": asdict(result),
            "without": None,
            "ratio": None,
        }
        if isinstance(result, Burst) and isinstance(without, Burst):
            entry["without"] = {"deliveries_per_s": without.deliveries_per_s}
            if without.deliveries_per_s:
                entry["ratio"] = result.deliveries_per_s / without.deliveries_per_s
                say(f"  {entry['ratio']:.1%} of the throughput without them (target: 80 %)")
        elif isinstance(result, Paced) and isinstance(without, Paced):
            entry["without"] = {"latency_ms": without.latency_ms}
            before, after = without.latency_ms["p50"], result.latency_ms["p50"]
            if before and after is not None:
                entry["ratio"] = after / before
                say(f"  p50 {entry['ratio']:,.1f} times the p50 without them")
        say(f"  waiting up to {self.args.slow_wait:g}s for the slow URLs' backlog ...")
        entry["slow_urls"] = settled = self.settle(sent)
        for url in settled["urls"]:
            say(
                f"  {url['url']} ({url['answers']}): answered {url['expected_answered']} of "
                f"{url['expected']} events, dead-lettered {url['dead_lettered']}, "
                f"{url['requests']} requests, at most {url['max_in_flight']} at once"
            )
        if not settled["settled"]:
            self.note(
                f"{what}: the slow URLs had not got every event {self.args.slow_wait:g}s after "
                "the run (--slow-wait); a run after it starts while the publisher still works "
                "through them"
            )
        topology.subscribe_slow([])
        section["runs"].append(entry)
        return result

    def settle(self, sent: set[str]) -> dict[str, Any]:
        """Until each slow URL answered every event ``sent``, or the publisher gave up on it
        (a dead letter), or --slow-wait passed: what each got."""
        assert self.slow is not None
        callbacks, began = self.slow, time.monotonic()
        while True:
            stats = callbacks.stats()
            buried = self.driver.dead_letters(callbacks.urls, sent)
            urls = [
                {
                    "url": url,
                    "answers": slow.describe_delay(stat["delay"]),
                    **stat,
                    "dead_lettered": buried[url],
                }
                for url, stat in zip(callbacks.urls, stats, strict=True)
            ]
            done = all(url["expected_answered"] + url["dead_lettered"] >= len(sent) for url in urls)
            waited = time.monotonic() - began
            if done or waited > self.args.slow_wait:
                return {"settled": done, "waited_s": round(waited, 2), "urls": urls}
            self.topology.check_running()
            time.sleep(0.5)

    def events_for(self, copies: int, base_rate: float | None) -> int:
        """N, lowered for M>1 when the burst would take much longer than --burst-budget."""
        events: int = self.args.events
        budget: float = self.args.burst_budget
        if copies == 1 or not budget or not base_rate:
            return events
        estimate = events * copies / base_rate
        if estimate <= budget:
            return events
        lowered = max(100, int(budget * base_rate / copies) // 100 * 100)
        if lowered >= events:
            return events
        self.note(
            f"M={copies}: N lowered from {events} to {lowered}: at the M=1 rate "
            f"({base_rate:.0f}/s) {events * copies} deliveries would take {estimate:.0f}s, over "
            f"the --burst-budget of {budget:g}s that keeps the default run under 3 minutes "
            f"(--burst-budget 0 runs N={events})"
        )
        return lowered

    def finish(self) -> None:
        topology = self.topology
        self.stop_sides()
        self.results["peak_rss_mib"] = topology.by_kind(procstat.peak_rss_mib) | {
            "driver (publish)": driver_peak_rss_mib()
        }
        self.results["lines"] = report.mode_lines(self.results)
        self.results["meta"]["loadavg"]["end"] = os.getloadavg()[0]
        self.results["meta"]["seconds"] = round(
            (dt.datetime.now(dt.timezone.utc) - self.started).total_seconds(), 1
        )

    def write(self) -> None:
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        out = self.args.output_dir
        json_path, png_path = out / f"{stamp}.json", out / f"{stamp}.png"
        say()
        for line in report.table(self.results):
            say(line)
        say()
        report.write_json(self.results, json_path)
        say(f"Results: {json_path}")
        why_not = report.chart(self.results, png_path)
        say(why_not or f"Chart:   {png_path}")
        say(f"Took {self.results['meta']['seconds']:.0f}s in all.")
        say()
        for line in self.results["lines"]:
            say(line)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (
        args.events < 1
        or args.duration <= 0
        or args.concurrency < 1
        or args.workers < 1
        or args.memory_events < 1
    ):
        parser().error(
            "--events, --duration, --concurrency, --workers and --memory-events must be positive"
        )
    if not procstat.available():
        parser().error("needs Linux's /proc to measure the processes' CPU and memory")
    # Stop everything on Ctrl-C and on kill, also when started with SIGINT ignored (nohup, &).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    if args.slow is None and (args.slow_compare or args.slow_wait != 60.0):
        parser().error("--slow-compare and --slow-wait go with --slow")
    if (args.read_timeout is not None and args.read_timeout <= 0) or args.slow_wait < 0:
        parser().error("--read-timeout must be positive, --slow-wait not negative")
    run = Run(args)
    status = 0
    try:
        run.run()
        run.finish()
    except KeyboardInterrupt:
        say("\nInterrupted.")
        status = 130
    except (TopologyError, TimeoutError, RuntimeError) as exc:
        say(f"Benchmark failed: {exc}")
        status = 2
    finally:
        if run.sides is not None:
            run.sides.stop()
        say(f"Stopping {len(run.topology.processes)} processes ...")
        for line in run.topology.stop():
            say(f"  {line}")
        if run.slow is not None:
            run.slow.stop()
    if status:
        say(f"Logs: {run.topology.log_dir}")
        return status
    run.write()
    if not run.clean:
        say("FAILED: events were lost or delivered twice (see the table)")
        return 1
    return 0
