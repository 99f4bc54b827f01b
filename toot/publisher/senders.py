"""A worker process's sender threads: they send what waits in the URLs' lanes.

They claim work while a drain of the ``out`` queue runs in the process (``hosting``): a
worker sending is running a task. What they hold when it ends they finish in the
background; a process that exits meanwhile (a warm shutdown) leaves it to be sent again
once the pool's lease ends. Each thread claims one URL's work at a time
(``toot.publisher.lanes``), sends it, and ends that claim in the same round trip as it
claims the next, so that a thread waiting on a slow subscriber holds back nobody else.
Threads are started as work needs them, up to ``SENDERS``, and one stays looking for
work while the others send: a URL answering slowly adds threads, not latency.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from toot.conf import conf
from toot.engine.queue import new_id
from toot.publisher import lanes

logger = logging.getLogger(__name__)

# An idle thread looks for work this often, for what other processes made due (retries,
# a URL whose requests returned); what this process fans out wakes it at once.
POLL_SECONDS = 0.05
# While Redis is unreachable a thread tries again after this long, and says so this often.
ERROR_PAUSE = 1.0
QUIET_SECONDS = 60.0

Send = Callable[[lanes.Claim, Callable[[], None]], None]


class Senders:
    """This process's sender threads, under one lease (``host``) in Redis."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.host = new_id()
        self._cond = threading.Condition()
        self._hosting = 0  # drains of the out queue running in this process
        self._threads = 0
        self._idle = 0  # threads waiting for work
        self._busy = 0  # threads holding a claim
        self._nudged = False  # work came since a thread last looked
        self._claims = 0  # claims taken so far, which a fanning-out drain waits on
        self._claimed = threading.Condition()
        self._renewed = -math.inf
        self._last_complaint = -math.inf

    @contextmanager
    def hosting(self) -> Iterator[Callable[[], bool]]:
        """Send while the block runs; yields whether sending is under way. On leaving,
        the threads end their claims (a request in flight finishes) before it returns."""
        lanes.renew(self.host)
        self._renewed = time.monotonic()
        with self._cond:
            self._hosting += 1
            self._look_for_work()
        try:
            yield self.busy
        finally:
            # The threads finish the claims they hold and end, without the drain waiting
            # for them: one handing over to its next message must not keep this worker
            # process from taking it (or anything else) while a slow subscriber answers.
            with self._cond:
                self._hosting -= 1
                self._cond.notify_all()

    def busy(self) -> bool:
        """Whether a thread holds a claim, or a lane is due before the relay would start
        a drain for it (a retry, a rate-limited URL's next event): asked as the drain is
        about to end, which it then does not."""
        with self._cond:
            if self._busy > 0:
                return True
        due = lanes.wake()
        return due is not None and due <= conf.RELAY_INTERVAL

    def nudge(self, wait: float = 0.0) -> None:
        """Wake a waiting thread: this process just made work due; and wait up to
        ``wait`` seconds for a thread to claim some.

        The drain that fans out waits so, rather than run ahead of its senders: what is
        published meanwhile waits in its queue and goes out in one batch, not in as many
        small ones as it claims.
        """
        with self._claimed:
            claims = self._claims
        with self._cond:
            self._look_for_work()
        if wait:
            with self._claimed:
                self._claimed.wait_for(lambda: self._claims != claims, wait)

    def keep_alive(self) -> None:
        """Renew the pool's lease once a quarter of it has passed (before each request)."""
        if time.monotonic() - self._renewed > conf.LEASE_SECONDS / 4:
            lanes.renew(self.host)
            self._renewed = time.monotonic()

    def _look_for_work(self) -> None:
        """Wake a waiting thread, or start one if every thread is sending (to a slow
        subscriber, say): work that just came must not wait for them. A thread that is
        claiming already will look again before it waits."""
        self._nudged = True
        if self._idle:
            self._cond.notify()
        elif self._threads == self._busy and self._threads < conf.SENDERS:
            self._spawn()

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._run, name="toot-send", daemon=True).start()

    def _run(self) -> None:
        ended: lanes.Claim | None = None
        try:
            while True:
                with self._cond:
                    take = self._hosting > 0
                if not take and ended is None:
                    return
                try:
                    reply = lanes.claim(self.host, new_id(), ended, take=take)
                except Exception as exc:  # Redis down: keep the claim, end it once back
                    self._complain(exc)
                    time.sleep(ERROR_PAUSE)
                    continue
                if ended is not None and reply is not None:
                    log_transition(ended.url, reply.transition)
                ended = None
                if reply is None:  # the lease ended (a long pause): what we held went back
                    try:
                        lanes.renew(self.host)
                    except Exception as exc:  # Redis gone since: the next claim says when back
                        self._complain(exc)
                        time.sleep(ERROR_PAUSE)
                        continue
                    self._renewed = time.monotonic()
                    continue
                self._renewed = time.monotonic()
                if reply.claim is not None:
                    ended = self._sending(reply.claim)
                    continue
                if not take or not self._wait(reply.wait):
                    return
        finally:
            with self._cond:
                self._threads -= 1
                last = not self._threads and not self._hosting
            if last:
                with contextlib.suppress(Exception):  # else the lease ends by itself
                    lanes.release(self.host)

    def _sending(self, claim: lanes.Claim) -> lanes.Claim:
        with self._cond:
            self._busy += 1
            if self._hosting and self._threads == self._busy and self._threads < conf.SENDERS:
                self._spawn()  # one keeps looking while this one sends
        with self._claimed:
            self._claims += 1
            self._claimed.notify_all()
        logger.debug("Senders %s claimed %d items of %s", self.host, len(claim.items), claim.url)
        try:
            if claim.probe:
                logger.info("Callback URL %s: circuit half-open, sending a probe", claim.url)
            self.send(claim, self.keep_alive)
        finally:
            with self._cond:
                self._busy -= 1
        return claim

    def _wait(self, due_in: float | None) -> bool:
        """Wait for work; False when this thread should end (another one waits already)."""
        with self._cond:
            if self._idle > 0 or not self._hosting:
                return False
            if self._nudged:  # work came while this thread claimed: look again at once
                self._nudged = False
                return True
            self._idle += 1
            try:
                self._cond.wait(min(POLL_SECONDS, POLL_SECONDS if due_in is None else due_in))
            finally:
                self._idle -= 1
            return self._hosting > 0

    def _complain(self, exc: Exception) -> None:
        if time.monotonic() - self._last_complaint > QUIET_SECONDS:
            self._last_complaint = time.monotonic()
            logger.warning("toot senders cannot reach Redis, will keep trying: %s", exc)


def log_transition(url: str, transition: str) -> None:
    if transition == lanes.OPENED:
        logger.warning(
            "Callback URL %s: circuit open after failing again; deliveries to it wait "
            "%.0fs for a probe",
            url,
            conf.BREAKER_SECONDS,
        )
    elif transition == lanes.CLOSED:
        logger.warning(
            "Callback URL %s: the probe was delivered, circuit closed; its backlog flows "
            "again, one request in flight at first",
            url,
        )
    elif transition == lanes.DISABLED:
        logger.error(
            "Callback URL %s: failing for %.0fs, disabled; what waits for it becomes dead "
            "letters until `manage.py toot_callbacks --enable %s`",
            url,
            conf.DISABLE_AFTER,
            url,
        )
