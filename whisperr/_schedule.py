"""Scheduling: which batch goes next, what an outcome does to it, and when a flush is done.

Pure synchronous policy, no event loop: every method that depends on time takes ``now`` (a
``time.monotonic()`` reading, the same in every host the runner may move between), so it is
tested with tables. Lifetime: one per client, reset in a forked child. Only the runner calls
the batch methods; :class:`FlushBarriers` is also used by callers' threads, under its lock.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from ._batches import Batch, take_batch
from ._config import Settings
from ._events import Item
from ._intake import NEVER, Intake, bytes_of
from ._ledger import Ledger, events
from ._models import ReportType
from ._signal import Signal
from ._transport import Outcome, backoff

if TYPE_CHECKING:
    from ._spooler import Spooler

logger = logging.getLogger("whisperr")

# While a body limit is learned, a batch larger than it goes whole again (up to max_batch_bytes)
# this many seconds after the limit was learned or last tried so: the server's limit may rise.
RETRY_WHOLE_AFTER = 600.0


@attrs.define(eq=False)
class Waiter:
    """A flush() in progress: every position below ``target`` must settle after ``round`` began."""

    target: int
    round: int
    done: Signal = attrs.field(factory=Signal)


class FlushBarriers:
    """The flushes waiting, and the rounds that give kept batches one more attempt per flush."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.round = 0
        self._waiters: list[Waiter] = []
        self.drain_to = 0  # positions below it go out at once, without a waiter (a loop ended)
        self._closed = False

    def add(self, target: int) -> Waiter:
        """A waiter for ``target``; already done once the client closed (nothing will settle)."""
        with self._lock:
            self.round += 1
            waiter = Waiter(target, self.round)
            if self._closed:
                waiter.done.set()
            else:
                self._waiters.append(waiter)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def new_round(self) -> None:
        with self._lock:
            self.round += 1

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        with self._lock:
            return iter(list(self._waiters))

    def release_all(self) -> None:
        for waiter in self:
            self.remove(waiter)
            waiter.done.set()

    def close(self) -> None:
        """The client closed: release every waiter, now and to come."""
        with self._lock:
            self._closed = True
        self.release_all()


@attrs.define
class BodyLimit:
    """The largest request body the server takes, as its 413 answers taught it.

    ``refused`` is the smallest body of a batch (of more than one event) answered 413 and
    ``fits`` the size batches are cut to: None until a half of a refused batch is delivered,
    then the largest body delivered below ``refused``. A small batch delivered meanwhile
    teaches nothing (it would cut every batch to its size). What contradicts them is unlearned:
    a body delivered at ``refused`` or above forgets both (the server takes more now), one
    refused at ``fits`` or below is learned again (it takes less). ``retry_whole_at``: when
    the next batch larger than ``fits`` goes whole, a try of ``max_batch_bytes`` again.
    """

    max_batch_bytes: int
    refused: int | None = None
    fits: int | None = None
    retry_whole_at: float = 0.0

    def pieces(self, batch: Batch, now: float) -> list[Batch]:
        """A batch just taken from the queue, cut to ``fits``; whole (up to ``max_batch_bytes``)
        when ``retry_whole_at`` has passed, which sets the next try a period later."""
        fits = self.fits
        if fits is None or len(batch.items) == 1 or batch.body_size <= fits:
            return [batch]  # a lone event larger than fits goes too: only a 413 drops it
        if now >= self.retry_whole_at:
            self.retry_whole_at = now + RETRY_WHOLE_AFTER
            return [batch]
        return batch.cut(fits)

    def too_large(self, batch: Batch) -> list[Batch]:
        """A batch of more than one event was answered 413: the pieces to send again."""
        size = batch.body_size
        self.refused = size if self.refused is None else min(self.refused, size)
        if self.fits is not None and size > self.fits:
            return batch.cut(self.fits)
        self.fits = None  # nothing learned yet, or the server takes less now: halves find it
        return list(batch.halves())

    def delivered(self, batch: Batch, now: float) -> None:
        """A batch (not an identify) was delivered: what its body size teaches."""
        refused = self.refused
        if refused is None:
            return
        size = batch.body_size
        if size >= refused:
            self.refused = self.fits = None
            logger.info(
                "whisperr: the server took a request body of %d bytes (it refused %d before); "
                "batches go up to max_batch_bytes=%d again",
                size,
                refused,
                self.max_batch_bytes,
            )
        elif self.fits is not None:
            self.fits = max(self.fits, size)
        elif batch.half:
            self.fits = size
            self.retry_whole_at = now + RETRY_WHOLE_AFTER
            logger.warning(
                "whisperr: the server answered 413 (payload too large) to a request body of %d "
                "bytes; batches are cut to %d bytes from now on, the largest body it took since. "
                "Lower max_batch_bytes (now %d) to %d to spare the 413s; every %d minutes one "
                "batch tries max_batch_bytes again",
                refused,
                size,
                self.max_batch_bytes,
                size,
                RETRY_WHOLE_AFTER // 60,
            )


class Scheduler:
    """The batches taken from the intake: in flight, or kept after a failure to be sent again."""

    def __init__(
        self, settings: Settings, intake: Intake, ledger: Ledger, base_context: bytes
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._base_context = base_context
        self.ledger = ledger
        self.spooler: Spooler | None = None  # set by the client with spool_path
        # What the server's 413s taught; kept in a forked child, which talks to the same server.
        self.body_limit = BodyLimit(settings.max_batch_bytes)
        self.reset()

    def reset(self) -> None:
        """Nothing kept or in flight (at creation, and in a forked child)."""
        self.barriers = FlushBarriers()
        self.retained: list[Batch] = []
        self.in_flight: set[Batch] = set()
        self.retained_events = 0
        self.retained_bytes = 0
        self.in_flight_events = 0
        self._timer_start: float | None = None
        self._paused_until = 0.0
        self._pause_level = 0
        self._failures = 0  # consecutive failed attempts, across batches

    # -- which batch next ----------------------------------------------------------------

    def urgent(self, closing: bool) -> bool:
        """Whether queued events go out now instead of waiting for a full batch or the timer."""
        return closing or bool(self.barriers) or self._intake.head < self.barriers.drain_to

    def sendable(self, now: float) -> list[Batch]:
        rnd = self.barriers.round
        return [b for b in self.retained if b.retained_round < rnd or now >= self._paused_until]

    def encode_ahead(self) -> bool:
        """Encode a step of the queue's next batch before it is taken; True while steps remain
        (the runner yields between two, and takes the batch once this says False)."""
        s = self._settings
        return self._intake.encode_ahead(
            max_size=s.max_batch_size, max_bytes=s.max_batch_bytes, base_context=self._base_context
        )

    def ready_batch(self, now: float, closing: bool = False) -> Batch | None:
        """The next batch to send now, moved in flight; None if none should go yet.

        ``closing``: the client is closing, so the queue goes out whatever its size."""
        batch = self._choose(now, closing)
        if batch is not None:
            self.in_flight.add(batch)
            self.in_flight_events += len(batch.items)
        return batch

    def _choose(self, now: float, closing: bool) -> Batch | None:
        s = self._settings
        # Once attempts keep failing (not one isolated failure), one batch probes the server and
        # the rest wait in the queue: the client backs off as a whole.
        limit = 1 if self._failures >= 2 else s.max_concurrency
        in_flight = self.in_flight
        if in_flight and (len(in_flight) >= limit or any(b.identify for b in in_flight)):
            return None
        sendable = self.sendable(now)
        if sendable:
            batch = sendable[0]
            if batch.identify and in_flight:
                return None  # identify is a barrier: everything before it settles first
            self._unretain(batch)
            return batch
        intake = self._intake
        if not len(intake):
            return None
        if self.spooler is not None and self.spooler.holds_queue(now):
            return None  # what the spool holds goes first: its claim comes back in a moment
        urgent = self.urgent(closing)
        # Kept batches go first, after their pause; a flush or close still gives the queue its
        # attempt, unless a kept identify must stay ahead of the tracks queued after it.
        if self.retained and (not urgent or any(b.identify for b in self.retained)):
            return None
        if intake.identify_first() and in_flight:
            return None
        if urgent or len(intake) >= s.batch_due_at or self._due(now):
            taken = intake.take(
                max_size=s.max_batch_size,
                max_bytes=s.max_batch_bytes,
                base_context=self._base_context,
                now=s.clock(),
            )
            if not len(intake):
                self._timer_start = None
            if taken is None:
                return None
            if self.spooler is not None and self.spooler.always:
                taken.spooled = True  # journaled: deleted from the file once settled
            first, *rest = self.body_limit.pieces(taken, now)
            for piece in rest:
                self.retain(piece, front=True)  # sent next, before the queue
            return first
        return None

    def _due(self, now: float) -> bool:
        if self._timer_start is None:
            self._timer_start = now
        return now >= self._timer_start + self._settings.flush_interval

    def next_deadline(self, now: float) -> float | None:
        """How long the runner may sleep before it has something to do on its own."""
        deadlines = []
        if self.retained:
            deadlines.append(self._paused_until - now)
        intake = self._intake
        if len(intake) and self._timer_start is not None:
            deadlines.append(self._timer_start + self._settings.flush_interval - now)
        if len(intake):
            intake.wake_at = self._settings.batch_due_at
        else:
            intake.wake_at = 1
            if len(intake):  # appended by a thread that saw the runner awake: look again
                return 0.0
        # A deadline already passed, yet no batch was ready: something in flight holds the next
        # one back, and its end wakes the runner. Sleeping 0 would spin.
        ahead = [d for d in deadlines if d > 0]
        return min(ahead) if ahead else None

    def hold_wakes(self) -> None:
        """The runner is awake: track() need not wake it until it sleeps again."""
        self._intake.wake_at = NEVER

    def drained(self, now: float) -> bool:
        """Closing and nothing left that could still be sent."""
        queue_done = not len(self._intake) or self.held_by_identify(self.barriers.round)
        return not self.in_flight and queue_done and not self.sendable(now)

    def idle(self) -> bool:
        """Nothing queued, kept or in flight, and nobody waiting."""
        return not (len(self._intake) or self.retained or self.in_flight or self.barriers)

    # -- outcomes ------------------------------------------------------------------------

    def attempted(self, outcome: Outcome) -> None:
        """Count one attempt's outcome towards the whole-client backoff."""
        self._failures = self._failures + 1 if outcome.kind in ("retry", "auth") else 0

    def settle(self, batch: Batch, outcome: Outcome | None, now: float) -> None:
        """What the last attempt's ``outcome`` means for ``batch`` (None: cut off, kept)."""
        self._land(batch)
        count = len(batch.items)
        settled = outcome is not None and (
            outcome.kind in ("ok", "drop") or (outcome.kind == "too_large" and count == 1)
        )
        if settled and batch.spooled and self.spooler is not None:
            self.spooler.forget(batch.message_ids)  # settled for good: out of the file
        if outcome is None:
            self.retain(batch)
        elif outcome.kind == "ok":
            rejected = min(outcome.rejected, count)
            self.ledger.deliver(count - rejected, batch.items, self._settings.clock())
            self._pause_level = 0
            if not batch.identify:
                self.body_limit.delivered(batch, now)
            if rejected:
                self.ledger.report(
                    "dropped",
                    "partially_rejected",
                    f"the server rejected {rejected} of {events(count)} in a batch",
                    outcome.status,
                    rejected,
                    (),
                )
        elif outcome.kind == "too_large" and count > 1:
            for piece in self.body_limit.too_large(batch):  # sent again at once, in order
                self.retain(piece, front=True)
        elif outcome.kind in ("drop", "too_large"):
            self.ledger.drop(batch.items, outcome.reason, outcome.message, outcome.status)
        else:
            kind: ReportType = "auth" if outcome.kind == "auth" else "retry_exhausted"
            batch.failure = outcome.reason
            batch.last_failure = outcome.message
            self.retain(batch)
            self.pause(now)
            self.ledger.report(
                kind,
                outcome.reason,
                f"{outcome.message}; {events(count)} kept for a later attempt",
                outcome.status,
                count,
                batch.message_ids,
            )

    def failed(self, batch: Batch, now: float) -> None:
        """An unexpected error while delivering: the batch is kept and the client pauses."""
        self._failures += 1
        self.pause(now)
        self.settle(batch, None, now)

    def _land(self, batch: Batch) -> None:
        if batch in self.in_flight:
            self.in_flight.discard(batch)
            self.in_flight_events -= len(batch.items)

    def retain(self, batch: Batch, *, front: bool = False) -> None:
        batch.retained_round = -1 if front else self.barriers.round
        self.retained.append(batch)
        self.retained.sort(key=lambda b: b.first)
        self.retained_events += len(batch.items)
        self.retained_bytes += bytes_of(batch.items)

    def _unretain(self, batch: Batch) -> None:
        self.retained.remove(batch)
        self.retained_events -= len(batch.items)
        self.retained_bytes -= bytes_of(batch.items)

    def cut_off(self) -> None:
        """Keep every batch in flight (its runner is gone): they are sent again, same ids."""
        for batch in list(self.in_flight):
            self._land(batch)
            self.retain(batch, front=True)

    def pause(self, now: float) -> None:
        s = self._settings
        self._pause_level += 1
        delay = backoff(
            min(self._pause_level, 30), max(s.backoff_base, 0.1), max(s.backoff_cap, 1.0), 0.5
        )
        self._paused_until = now + delay

    # -- flush barriers ------------------------------------------------------------------

    def held_by_identify(self, round: int) -> bool:
        """Whether a kept identify, tried again since ``round`` began, holds the queue back."""
        return any(b.identify and b.retained_round >= round for b in self.retained)

    def settled(self, waiter: Waiter) -> bool:
        if self._intake.head < waiter.target and not self.held_by_identify(waiter.round):
            return False
        if any(b.first < waiter.target for b in self.in_flight):
            return False
        return not any(
            b.first < waiter.target and b.retained_round < waiter.round for b in self.retained
        )

    def release_waiters(self) -> None:
        for waiter in self.barriers:
            if self.settled(waiter):
                self.barriers.remove(waiter)
                waiter.done.set()

    # -- the spool -----------------------------------------------------------------------

    def replaying(self) -> bool:
        """Whether events from the spool wait to be sent (they go before the queue)."""
        return any(b.spooled and b.first < 0 for b in self.retained)

    def replay(self, items: list[Item]) -> None:
        """Events claimed from the spool become batches kept at the front, ahead of every
        flush target (position -1); what cannot be sent any more is dropped and forgotten."""
        queue = deque(items)
        s = self._settings
        sent: list[str] = []
        while queue:
            batch, _ = take_batch(
                queue,
                -1,
                max_size=s.max_batch_size,
                max_bytes=s.max_batch_bytes,
                base_context=self._base_context,
                now=s.clock(),
                ledger=self.ledger,
            )
            if batch is not None:
                batch.spooled = True
                sent.extend(batch.message_ids)
                self.retain(batch, front=True)
        if self.spooler is not None and len(sent) < len(items):
            kept = set(sent)
            self.spooler.forget(item[4] for item in items if item[4] not in kept)

    def _spill(self, there: list[Item], fresh: list[Item], cause: str) -> None:
        """At close with a spool: ``there`` are in the file already (replayed, or journaled
        with spool_mode="always") and ``fresh`` go to it, instead of being dropped; ``cause``
        names the last failure, as the close-time drops do."""
        assert self.spooler is not None
        if there:
            self.spooler.keep(there)
        if fresh:
            self.spooler.spill(fresh)
        if there or fresh:
            last = self.ledger.last_error
            count = len(there) + len(fresh)
            self.ledger.report(
                "spooled",
                "shutdown" if last is None else last.reason,
                f"{events(count)} not delivered before the client closed went to the spool "
                f"{self.spooler.path} for a later client{cause}",
                None,
                count,
                (),
            )

    # -- close ---------------------------------------------------------------------------

    def account_undelivered(self) -> None:
        """At close: report everything not delivered, so that tracked == delivered + dropped
        (+ spooled: with a spool, the tracks left go there instead; identifies never do)."""
        leftovers: dict[tuple[str, str], list[Item]] = {}
        there: list[Item] = []
        fresh: list[Item] = []
        spooler = self.spooler
        last = self.ledger.last_error
        cause = f"; the last failure: {last.message}" if last is not None else ""

        def leave(items: list[Item], spooled: bool, key: tuple[str, str]) -> None:
            if spooler is None:
                leftovers.setdefault(key, []).extend(items)
                return
            for item in items:
                if item[1] is None:  # an identify
                    leftovers.setdefault(key, []).append(item)
                elif spooled:
                    there.append(item)
                else:
                    fresh.append(item)

        for batch in self.retained:
            why = f"; the last failure: {batch.last_failure}" if batch.last_failure else cause
            leave(batch.items, batch.spooled, (batch.failure, why))
        self.retained.clear()
        self.retained_events = self.retained_bytes = 0
        queued = self._intake.drain()
        if queued:
            leave(queued, spooler is not None and spooler.always, ("shutdown", cause))
        if spooler is not None:
            self._spill(there, fresh, cause)
        for (reason, why), items in leftovers.items():
            self.ledger.drop(items, reason, f"not delivered before the client closed{why}")
