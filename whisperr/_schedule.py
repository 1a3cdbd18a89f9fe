"""Scheduling: which batch goes next, what an outcome does to it, and when a flush is done.

Pure synchronous policy, no event loop: every method that depends on time takes ``now`` (a
``time.monotonic()`` reading, the same in every host the runner may move between), so it is
tested with tables. Lifetime: one per client, reset in a forked child. Only the runner calls
the batch methods; :class:`FlushBarriers` is also used by callers' threads, under its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import attrs

from ._batches import Batch
from ._config import Settings
from ._events import Item
from ._intake import NEVER, Intake, bytes_of
from ._ledger import Ledger
from ._models import ReportType
from ._signal import Signal
from ._transport import Outcome, backoff


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


class Scheduler:
    """The batches taken from the intake: in flight, or kept after a failure to be sent again."""

    def __init__(
        self, settings: Settings, intake: Intake, ledger: Ledger, base_context: bytes
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._base_context = base_context
        self.ledger = ledger
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
        urgent = self.urgent(closing)
        # Kept batches go first, after their pause; a flush or close still gives the queue its
        # attempt, unless a kept identify must stay ahead of the tracks queued after it.
        if self.retained and (not urgent or any(b.identify for b in self.retained)):
            return None
        if intake.identify_first() and in_flight:
            return None
        if urgent or len(intake) >= s.max_batch_size or self._due(now):
            taken = intake.take(
                max_size=s.max_batch_size,
                max_bytes=s.max_batch_bytes,
                base_context=self._base_context,
                now=s.clock(),
            )
            if not len(intake):
                self._timer_start = None
            return taken
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
            intake.wake_at = self._settings.max_batch_size
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
        if outcome is None:
            self.retain(batch)
        elif outcome.kind == "ok":
            rejected = min(outcome.rejected, count)
            self.ledger.deliver(count - rejected)
            self._pause_level = 0
            if rejected:
                self.ledger.report(
                    "dropped",
                    "partially_rejected",
                    f"the server rejected {rejected} of {count} events in a batch",
                    outcome.status,
                    rejected,
                    (),
                )
        elif outcome.kind == "too_large" and count > 1:
            for half in reversed(batch.halves()):  # sent again at once, in order
                self.retain(half, front=True)
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
                f"{outcome.message}; {count} events kept for a later attempt",
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

    # -- close ---------------------------------------------------------------------------

    def account_undelivered(self) -> None:
        """At close: report everything not delivered, so that tracked == delivered + dropped."""
        leftovers: dict[tuple[str, str], list[Item]] = {}
        last = self.ledger.last_error
        cause = f"; the last failure: {last.message}" if last is not None else ""
        for batch in self.retained:
            why = f"; the last failure: {batch.last_failure}" if batch.last_failure else cause
            leftovers.setdefault((batch.failure, why), []).extend(batch.items)
        self.retained.clear()
        self.retained_events = self.retained_bytes = 0
        queued = self._intake.drain()
        if queued:
            leftovers.setdefault(("shutdown", cause), []).extend(queued)
        for (reason, why), items in leftovers.items():
            self.ledger.drop(items, reason, f"not delivered before the client closed{why}")
