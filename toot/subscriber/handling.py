"""Running local handlers at most once per event, whatever the publisher retries.

Each (event id, handler) is claimed with a Redis key before the handler runs, and marked
done after. Done marks are kept for at least ``DEDUPE_TTL`` seconds, which must outlast
the publisher's retry window, so that a delivery retried after the handler ran does not
run it again.

A claim belongs to whoever took it, so that a crash costs no more than the lease of the
drain that died:

- a drain of a handler's lane claims the handler for its whole batch at once, under its
  lease id: such a claim lives as long as the lease. Once the drain dies and the relay
  gives its batch back, the drain that claims the batch next takes those claims over and
  runs the handler;
- a handler that is running holds its claim through this process's heartbeat (a thread
  that renews it every quarter of ``LEASE_SECONDS``), detached from the lease: a slow
  handler in a live process never runs twice, even once its drain's lease has gone, and
  one in a process that died is free to run again a lease later;
- a run outside a drain (a dead letter replayed), or a drain of the in queue itself (one
  replayed for every handler), holds its claims through the heartbeat from the start.

A handler's claims and done marks are in the Redis Cluster slot of its lane, with its
lane's leases: the claims of a batch take a script per handler, in one round trip.

A handler found running elsewhere is not a failure: its work is deferred, without
spending an attempt of ``RETRY_SCHEDULE``, and checked again ``DEFER_SECONDS`` later.

Done marks are the bulk of toot's Redis memory at any real rate: a key each cost about
220 bytes for three days. So they are 16-byte digests in one hash per hour of the
events' timestamps (about 90 bytes each), and each hash expires DEDUPE_TTL after its
last mark. The claim keys live only while a handler's work is under way.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from typing import TYPE_CHECKING, Any, TypedDict

from django.utils import timezone
from redis.client import Pipeline
from redis.crc import key_slot

from toot import signals
from toot.conf import conf
from toot.engine.connection import as_text, get_redis, run_scripts, slot
from toot.engine.per_process import PerProcess
from toot.engine.queue import IN, NOW, Lease, Retry, leases_key, new_id
from toot.engine.retries import next_delay
from toot.exceptions import AlreadyRunning
from toot.protocol.events import Event
from toot.subscriber.registry import Handler, registry

if TYPE_CHECKING:
    from toot.models import DeadLetter

logger = logging.getLogger(__name__)

DONE = "done"
RUNNING = "running"
CLAIMED = "claimed"
# Taken over from a drain whose lease ended: "taken:<its id>".
TAKEN = "taken:"
# The same (event, handler) a second time in one batch: the first covers it.
TWICE = "twice"
# A claim of a drain's that its work never comes back to is dropped after this long. It
# is a backstop only: a dead drain's work comes back, and is claimed again, a lease later.
ORPHAN_SECONDS = 24 * 3600
# Work found running elsewhere is checked again after this long.
DEFER_SECONDS = 5.0
# What a claim held through the heartbeat starts with; a lease id never does.
DETACHED = "~"
HOUR = 3600

# KEYS: the leases of a handler's lane, then (done hash, claim key) per event, all in the
# lane's slot; ARGV: the claims' lifetime in ms, the owner (a drain's lease id, or a
# detached token), then a field per event. Returns, per event: "done"; "running" when a
# live owner holds the claim (a detached one, or a drain of the lane whose lease has not
# ended); "claimed"; "taken:<owner>" when it was a dead drain's; "twice" for an event
# already met in this call.
CLAIM_SCRIPT = (
    NOW
    + """
local owner = ARGV[2]
local seen, states = {}, {}
for i = 2, #KEYS, 2 do
  local field, claim = ARGV[i / 2 + 2], KEYS[i + 1]
  local state
  if seen[claim] then
    state = 'twice'
  elseif redis.call('HEXISTS', KEYS[i], field) == 1 then
    state = 'done'
  else
    local held = redis.call('GET', claim)
    local lease = held and redis.call('ZSCORE', KEYS[1], held)
    if held and held ~= owner
        and (string.sub(held, 1, 1) == '~' or (lease and tonumber(lease) > now)) then
      state = 'running'
    else
      redis.call('SET', claim, owner, 'PX', ARGV[1])
      state = (held and held ~= owner) and ('taken:' .. held) or 'claimed'
    end
  end
  seen[claim] = true
  states[#states + 1] = state
end
return states
"""
)
# KEYS: claim keys; ARGV: lifetime in ms, then (owner, detached token) per key. Holds
# each claim still the owner's, or already detached, for ``lifetime`` more as detached.
HOLD_SCRIPT = """
for i, claim in ipairs(KEYS) do
  local held = redis.call('GET', claim)
  if held and (held == ARGV[2 * i] or held == ARGV[2 * i + 1]) then
    redis.call('SET', claim, ARGV[2 * i + 1], 'PX', ARGV[1])
  end
end
"""
# Handler runs are counted per minute (``minutes``) for this long: an hour and a few
# minutes.
MINUTES_KEPT = 65 * 60
# KEYS: done hash, claim key; ARGV: owner, detached token, field, and, if the run
# succeeded, when the hash may expire ("" if it failed). Marks a success done and ends the
# claim if it is still the run's own, in one step: a run that checks between the two sees
# either.
END_SCRIPT = """
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[3], 1)
  redis.call('EXPIREAT', KEYS[1], ARGV[4])
end
local held = redis.call('GET', KEYS[2])
if held == ARGV[1] or held == ARGV[2] then redis.call('DEL', KEYS[2]) end
"""


class Heartbeat(threading.Thread):
    """Holds the claims of this process's running handlers while they run.

    One thread per process, started on first use: every quarter of ``LEASE_SECONDS`` it
    detaches each claim it holds from its drain's lease and extends it by a lease. Most
    handlers return long before the next beat, and cost it nothing.
    """

    def __init__(self) -> None:
        super().__init__(name="toot-heartbeat", daemon=True)
        self._held: dict[str, tuple[str, str]] = {}  # claim key: (owner, detached token)
        self._lock = threading.Lock()
        self.start()

    @contextmanager
    def holding(self, claims: Mapping[str, tuple[str, str]]) -> Iterator[None]:
        """Hold ``claims`` (claim key: (owner, detached token)) while the block runs."""
        with self._lock:
            self._held.update(claims)
        try:
            yield
        finally:
            with self._lock:
                for claim in claims:
                    self._held.pop(claim, None)

    def run(self) -> None:
        while True:
            time.sleep(conf.LEASE_SECONDS / 4)
            self.beat()

    def beat(self) -> None:
        with self._lock:
            held = list(self._held.items())
        if not held:
            return
        lifetime = int(conf.LEASE_SECONDS * 1000)
        by_slot: dict[int, list[tuple[str, tuple[str, str]]]] = {}
        for claim in held:  # a script's keys share a slot (a handler's, on a Redis Cluster)
            by_slot.setdefault(key_slot(claim[0].encode()), []).append(claim)
        try:
            run_scripts(
                [
                    (
                        HOLD_SCRIPT,
                        [key for key, _ in claims],
                        [lifetime, *chain(*(v for _, v in claims))],
                    )
                    for claims in by_slot.values()
                ]
            )
        except Exception as exc:  # Redis down: the next beat tries again, within the lease
            logger.warning("Cannot renew the claims of running handlers: %s", exc)


heartbeat = PerProcess(Heartbeat)

# The event loop of the drain at work in this thread, if it has needed one.
_drain_loop = threading.local()


@contextmanager
def hosting() -> Iterator[Callable[[], bool]]:
    """What a drain of the in queue runs inside (``toot.engine.drain.HOSTS``): its async
    handlers share one event loop, made when the first needs it and closed as the drain
    ends, rather than one loop per event."""
    loops: list[asyncio.AbstractEventLoop] = []
    _drain_loop.loops = loops
    try:
        yield lambda: False
    finally:
        del _drain_loop.loops
        for loop in loops:
            _close(loop)


def call(handler: Handler, event: Event) -> None:
    """Run ``handler`` for ``event``; what an ``async def`` handler returns is awaited, on
    the drain's event loop when there is one, else on a loop of its own."""
    result = handler(event)
    if inspect.isawaitable(result):
        run_awaitable(result)


def run_awaitable(awaitable: Awaitable[object]) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # called from async code (a test's): its loop cannot wait here, a thread's can
        with ThreadPoolExecutor(1) as thread:
            thread.submit(run_awaitable, awaitable).result()
        return
    loops: list[asyncio.AbstractEventLoop] | None = getattr(_drain_loop, "loops", None)
    if loops is None:  # outside a drain: a dead letter replayed, toot.testing's delivery
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(_awaited(awaitable))
        finally:
            _close(loop)
        return
    if not loops:
        loops.append(asyncio.new_event_loop())
    loops[0].run_until_complete(_awaited(awaitable))


async def _awaited(awaitable: Awaitable[object]) -> None:
    await awaitable


def _close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


# Stands for every handler of the channel where none was found: its retry (and dead
# letter) runs them all once there are some again.
ALL = "*"


def handler_name(handler: Handler) -> str:
    # A callable object goes by its class: its repr holds an address, different in each process.
    named = handler if hasattr(handler, "__qualname__") else type(handler)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"


def handlers_by_name(channel: str) -> dict[str, Handler]:
    """The channel's handlers by stable name; same-named ones (lambdas) get #2, #3..."""
    named: dict[str, Handler] = {}
    for handler in registry.handlers_for(channel):
        name = base = handler_name(handler)
        n = 1
        while name in named:
            n += 1
            name = f"{base}#{n}"
        named[name] = handler
    return named


def lane(name: str) -> str:
    """The in queue's lane of the handler ``name``: its events wait, are retried and are
    drained there, apart from other handlers' (a slow one holds back only its own)."""
    return f"{IN}:{name}"


def celery_queue(lane: str) -> str | None:
    """The Celery queue that the lane's drains go to: its handler's ``subscribe(...,
    queue=...)``, the first subscription's if there are several (toot.W008); None for
    the task's own."""
    base = lane.partition(":")[2].partition("#")[0]  # "#2": a same-named handler's
    return next(
        (sub.queue for sub in registry.subscriptions if handler_name(sub.handler) == base), None
    )


def _field(event: Event, name: str) -> bytes:
    return hashlib.blake2b(f"{event.id}\0{name}".encode(), digest_size=16).digest()


def _handled(name: str) -> str:
    # A handler's done marks and claims are in the slot of its lane.
    return f"{conf.KEY_PREFIX}handled:{slot(lane(name))}:"


def _done_key(event: Event, name: str) -> str:
    return f"{_handled(name)}{int(event.timestamp.timestamp()) // HOUR}"


def _claim_key(event: Event, name: str) -> str:
    return _claim_key_of(_field(event, name), name)


def _claim_key_of(field: bytes, name: str) -> str:
    return f"{_handled(name)}running:{field.hex()}"


def _done_until(event: Event) -> int:
    """When the event's hash may go: DEDUPE_TTL after its hour, counted from now at the
    earliest (a late event is remembered as long as any) and an hour from now at the
    latest (a timestamp in the future pins nothing for long)."""
    now = time.time()
    hour_end = (int(event.timestamp.timestamp()) // HOUR + 1) * HOUR
    return int(min(max(hour_end, now), now + HOUR)) + conf.DEDUPE_TTL


def minute_key(minute: int | None = None) -> str:
    """The HASH that counts the handler runs of ``minute`` (default: this one, by this
    machine's clock, in minutes since the epoch): ``handled`` and ``failed``."""
    if minute is None:
        minute = int(time.time()) // 60
    return f"{conf.KEY_PREFIX}handled:minute:{minute}"


def _count_run(outcome: str) -> Callable[[Pipeline], object]:
    """Counts a handler run in this minute's counters, in the round trip that ends it, apart
    from the end's script: on a Redis Cluster the counters are in a slot of their own."""
    minute = minute_key()
    return lambda pipe: (pipe.hincrby(minute, outcome, 1), pipe.expire(minute, MINUTES_KEPT))


def minutes(count: int = 60) -> tuple[int, list[dict[str, int]]]:
    """The handler runs of the last ``count`` minutes, oldest first, and this minute."""
    current = int(time.time()) // 60
    with get_redis().pipeline(transaction=False) as pipe:
        for minute in range(current - count + 1, current + 1):
            pipe.hgetall(minute_key(minute))
        replies = pipe.execute()
    return current, [{as_text(k): int(v) for k, v in reply.items()} for reply in replies]


def state(event: Event, name: str) -> str | None:
    """DONE, RUNNING or None (neither) for the event's handler ``name``."""
    client = get_redis()
    if client.hexists(_done_key(event, name), _field(event, name)):
        return DONE
    return RUNNING if client.exists(_claim_key(event, name)) else None


def run(event: Event, names: list[str] | None = None, *, attempt: int = 1) -> dict[str, Exception]:
    """Run the event's handlers (only ``names`` if given) here and now, outside any drain;
    returns the failures by name. Signals each run as attempt ``attempt``, not retried."""
    durations: list[dict[str, float]] = []
    failures = run_many([(event, names)], durations=durations)[0]
    signal_runs(event, durations[0], failures, attempt, None)
    return failures


def run_many(
    jobs: list[tuple[Event, list[str] | None]],
    lease: Lease | None = None,
    *,
    durations: list[dict[str, float]] | None = None,
    traceparents: list[str | None] | None = None,
) -> list[dict[str, Exception]]:
    """Run each event's handlers (only the names given, if any); the failures of each.

    The claims of the whole batch take one round trip, under the drain's ``lease`` (see
    the module's docstring); without one, as a run of its own. Each run is marked done as
    soon as it returns, not with the batch: a worker killed by a later handler must not
    leave the earlier ones to run again. A name that is no longer subscribed (renamed or
    removed by a deploy) is a failure, not a silent success: its retries and its dead
    letter keep the work visible. A handler running elsewhere fails with AlreadyRunning.
    ``durations``, if given, gets for each job the seconds each handler that ran took.
    With TRACING on, each run is a span, child of the job's ``traceparents`` entry if any.
    """
    failures: list[dict[str, Exception]] = []
    timings: list[dict[str, float]] = [] if durations is None else durations
    timings[:] = [{} for _ in jobs]
    planned: list[tuple[int, Event, str, Handler]] = []
    by_channel: dict[str, dict[str, Handler]] = {}  # a batch is mostly of one channel
    for index, (event, names) in enumerate(jobs):
        named = by_channel.get(event.channel)
        if named is None:
            named = by_channel[event.channel] = handlers_by_name(event.channel)
        if names == [ALL]:
            names = None
        if names is None and not named:
            # Unsubscribed since the event was accepted (a deploy), or queued by a project
            # that shares this KEY_PREFIX: kept visible, not dropped as handled.
            failures.append({ALL: LookupError(f"no handler for {event.channel} here")})
            continue
        failures.append(
            {
                name: LookupError(f"{name} is not subscribed to {event.channel} here")
                for name in names or ()
                if name not in named
            }
        )
        planned += [
            (index, event, name, handler)
            for name, handler in named.items()
            if names is None or name in names
        ]
    if not planned:
        return failures
    fields = [_field(event, name) for _, event, name, _ in planned]
    # (done hash, claim key) per planned run, in the slot of its handler's lane.
    pairs = [
        (_done_key(event, name), _claim_key_of(field, name))
        for (_, event, name, _), field in zip(planned, fields, strict=True)
    ]
    # A script per handler, its keys in one slot (on a Redis Cluster, a slot per handler),
    # all in one round trip. A drain of the handler's own lane claims under its lease; any
    # other run (outside a drain, or a drain of the in queue) holds its claims through the
    # heartbeat from the start, as a claim's owner is looked for only among the leases of
    # its own lane.
    runs: dict[str, list[int]] = {}
    for position, (_, _, name, _) in enumerate(planned):
        runs.setdefault(name, []).append(position)
    token = DETACHED + (lease.id if lease else new_id())
    owners: dict[str, tuple[str, str]] = {}
    held: dict[str, tuple[str, str]] = {}
    calls = []
    for name, positions in runs.items():
        lifetime: float
        if lease is not None and lease.queue == lane(name):
            owners[name], lifetime = (lease.id, token), ORPHAN_SECONDS
        else:
            owners[name], lifetime = (token, token), conf.LEASE_SECONDS
            held.update((pairs[position][1], owners[name]) for position in positions)
        keys = [leases_key(lane(name)), *chain(*(pairs[position] for position in positions))]
        owner = owners[name][0]
        calls.append(
            (CLAIM_SCRIPT, keys, [int(lifetime * 1000), owner, *(fields[p] for p in positions)])
        )
    states = [""] * len(planned)
    for positions, reply in zip(runs.values(), run_scripts(calls), strict=True):
        for position, state in zip(positions, reply, strict=True):
            states[position] = as_text(state)
    beating = heartbeat()
    traced = conf.TRACING
    if traced:
        from toot import tracing
    with beating.holding(held):
        for (index, event, name, handler), state, field, pair in zip(
            planned, states, fields, pairs, strict=True
        ):
            if state == TWICE:
                continue
            if state == DONE:
                logger.info(
                    "Event %s on %s: %s already handled it, skipped", event.id, event.channel, name
                )
                continue
            if state == RUNNING:
                failures[index][name] = AlreadyRunning(
                    f"{name} is already running for event {event.id}"
                )
                continue
            if state.startswith(TAKEN):
                logger.warning(
                    "Event %s on %s: %s was claimed by drain %s, whose lease ended; running "
                    "it here",
                    event.id,
                    event.channel,
                    name,
                    state[len(TAKEN) :],
                )
            if lease is not None:
                lease.keep_alive()
            done_until: int | str = ""
            with beating.holding({pair[1]: owners[name]}):
                started = time.perf_counter()
                try:
                    if not traced:
                        call(handler, event)
                    else:
                        traceparent = traceparents[index] if traceparents else None
                        with tracing.running(event, name, traceparent):
                            call(handler, event)
                except Exception as exc:
                    timings[index][name] = time.perf_counter() - started
                    logger.exception(
                        "Event %s on %s: handler %s raised", event.id, event.channel, name
                    )
                    failures[index][name] = exc
                else:
                    timings[index][name] = time.perf_counter() - started
                    done_until = _done_until(event)
            end = (END_SCRIPT, pair, [*owners[name], field, done_until])
            run_scripts([end], before=_count_run("handled" if done_until else "failed"))
    return failures


class _Received(TypedDict):
    event: dict[str, Any]  # its wire form


class InItem(_Received, total=False):
    """An in queue item: an event the callbacks endpoint received, whose handlers are to
    run: with ``handlers``, those alone (its lane's handler, or a retry's failed ones)."""

    handlers: list[str]
    attempts: int
    first_attempt_at: str | None
    traceparent: str  # the receive span's context, when it was traced (toot.tracing)


def in_item(event: dict[str, Any], handler: str, traceparent: str | None) -> InItem:
    """The in queue item of an event received, for one handler's lane; ``traceparent``:
    the receive span's, when tracing."""
    item = InItem(event=event, handlers=[handler])
    if traceparent:
        item["traceparent"] = traceparent
    return item


def process(items: list[InItem], lease: Lease) -> list[Retry]:
    """Run the handlers of the claimed items; returns the retries to schedule.

    A handler that failed is retried alone on the publisher's schedule, then dead-lettered.
    One found running elsewhere is deferred: checked again in DEFER_SECONDS, its attempts
    unchanged, so that it never becomes a dead letter while that run lives.
    """
    jobs = [(Event.from_dict(item["event"]), item.get("handlers")) for item in items]
    retries: list[Retry] = []
    durations: list[dict[str, float]] = []
    traceparents = [item.get("traceparent") for item in items] if conf.TRACING else None
    failures = run_many(jobs, lease, durations=durations, traceparents=traceparents)
    for item, (event, _), failed, ran in zip(items, jobs, failures, durations, strict=True):
        attempts = item.get("attempts", 0)
        first_attempt_at = item.get("first_attempt_at")
        deferred = sorted(
            name for name, error in failed.items() if isinstance(error, AlreadyRunning)
        )
        if deferred:
            retries.append(({**item, "handlers": deferred}, DEFER_SECONDS))
            logger.info(
                "Event %s on %s: %s running elsewhere, checked again in %.0fs",
                event.id,
                event.channel,
                ", ".join(deferred),
                DEFER_SECONDS,
            )
            failed = {name: error for name, error in failed.items() if name not in deferred}
        if not failed:
            if not deferred:
                logger.info(
                    "Event %s on %s: handled%s",
                    event.id,
                    event.channel,
                    f" by {', '.join(ran)}" if ran else "",
                )
            signal_runs(event, ran, failed, attempts + 1, None)
            continue
        attempts += 1
        first_attempt_at = first_attempt_at or timezone.now().isoformat()
        delay = next_delay(attempts)
        if delay is None:
            for name, error in failed.items():
                bury_handler(item["event"], name, attempts, error, first_attempt_at)
            signal_runs(event, ran, failed, attempts, None)
            continue
        retry: InItem = {
            "event": item["event"],
            "handlers": sorted(failed),
            "attempts": attempts,
            "first_attempt_at": first_attempt_at,
        }
        if "traceparent" in item:
            retry["traceparent"] = item["traceparent"]
        retries.append((retry, delay))
        logger.warning(
            "Event %s on %s: handler %s failed (attempt %d), retrying in %.1fs",
            event.id,
            event.channel,
            ", ".join(sorted(failed)),
            attempts,
            delay,
        )
        signal_runs(event, ran, failed, attempts, delay)
    return retries


def signal_runs(
    event: Event,
    ran: dict[str, float],
    failed: dict[str, Exception],
    attempt: int,
    retry_in: float | None,
) -> None:
    """Send ``handler_succeeded`` for each handler that ran and returned, and
    ``handler_failed`` for each failure (toot.signals); those deferred are neither."""
    if not signals.wanted(signals.handler_succeeded, signals.handler_failed):
        return
    what = f"Event {event.id} on {event.channel}"
    for name, duration in ran.items():
        if name not in failed:
            signals.send(
                signals.handler_succeeded,
                Event,
                f"{what}, handler {name}",
                event=event,
                handler=name,
                attempt=attempt,
                duration=duration,
            )
    for name, error in failed.items():
        if not isinstance(error, AlreadyRunning):
            signals.send(
                signals.handler_failed,
                Event,
                f"{what}, handler {name}",
                event=event,
                handler=name,
                attempt=attempt,
                error=error,
                duration=ran.get(name),
                retry_in=retry_in,
            )


def bury_handler(
    event: dict[str, Any],
    handler: str,
    attempts: int,
    error: Exception,
    first_attempt_at: str | None,
) -> DeadLetter:
    from toot.models import DeadLetter

    logger.error(
        "Event %s on %s: handler %s failed for good after %d attempts (%r); dead-lettered",
        event["id"],
        event["channel"],
        handler,
        attempts,
        error,
    )
    letter = DeadLetter.bury(
        event,
        attempts,
        first_attempt_at,
        kind=DeadLetter.Kind.HANDLER,
        handler=handler,
        last_error=repr(error),
    )
    signals.send(
        signals.dead_lettered,
        DeadLetter,
        f"Event {event['id']} on {event['channel']}, handler {handler}",
        dead_letter=letter,
        event=Event.from_dict(event),
        kind=str(letter.kind),
    )
    return letter
