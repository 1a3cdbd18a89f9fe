"""Intake: the bounded, thread-safe queue between ``track()`` and the runner.

Lifetime: one per client, reset in a forked child. ``put()`` runs on the caller's path, in any
thread, without a lock (``deque.append`` is atomic); everything that takes from the front runs
under ``lock``, so a ``drop_oldest`` from a caller's thread and the runner's ``take()`` never
race.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable
from operator import itemgetter

from . import _events as ev
from ._batches import Ahead, Batch, take_batch
from ._errors import ClientClosedError
from ._ledger import Ledger

CLOSED_MESSAGE = "this whisperr client is closed; it takes no more events"
# About what a queued event costs beyond its encoded properties and context (the tuple, its
# float and strings), for ``stats().queued_bytes``; ``max_queue_bytes`` bounds the encoded
# properties and context alone.
ITEM_OVERHEAD = 128
NEVER = 1 << 62
_PROPERTIES = itemgetter(3)


class IntakeState(enum.Enum):
    """Whether the queue takes events."""

    OPEN = "open"  # track() queues events
    DISABLED = "disabled"  # disabled=True: events are validated, then discarded by design
    CLOSED = "closed"  # aclose() began: track() raises ClientClosedError


_OPEN = IntakeState.OPEN
_CLOSED = IntakeState.CLOSED
_DISABLED = IntakeState.DISABLED


class Intake:
    """The queue of captured messages, its positions and its bounds.

    Positions count messages since the client was made (or the process forked): ``head`` is how
    many ever left the queue (taken into a batch, or dropped), ``end`` is ``head`` plus what is
    queued. ``flush()`` waits for positions below the ``end`` it saw.

    Args:
        max_size: at most this many messages queued.
        max_bytes: at most about this many bytes queued (see ``ITEM_OVERHEAD``).
        drop_newest: on overflow refuse the new message instead of dropping the oldest.
        ledger: where drops are counted.
        wake: called (from the putting thread) when the queue reaches ``wake_at`` messages,
            and on the first drop of a reporting window.
    """

    def __init__(
        self,
        *,
        max_size: int,
        max_bytes: int,
        drop_newest: bool,
        ledger: Ledger,
        wake: Callable[[], None],
        disabled: bool,
    ) -> None:
        self._max_size = max_size
        self._max_bytes = max_bytes
        self._drop_newest = drop_newest
        self._ledger = ledger
        self._wake = wake
        self._initial = IntakeState.DISABLED if disabled else _OPEN
        # With a spool: where an event the bounds leave no room for goes instead of being
        # dropped (``queued``: it had been queued); from the putting thread.
        self.spill: Callable[[ev.Item, bool], None] | None = None
        self.reset()

    def reset(self) -> None:
        """Empty, with zeroed positions (at creation, and in a forked child)."""
        self.state = self._initial
        self.queue: deque[ev.Item] = deque()
        self.lock = threading.Lock()
        self.head = 0
        # Encoded bytes queued: added without the lock by put() (an int += between bytecodes that
        # do not switch threads in CPython), taken off under it; zeroed whenever the queue is.
        self.bytes = 0
        self.wake_at = 1  # the queue length at which put() calls wake
        self._ahead = Ahead()

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def end(self) -> int:
        return self.head + len(self.queue)

    def put(self, item: ev.Item, size: int) -> None:
        """Queue ``item`` (``size`` bytes encoded), within the bounds; any thread, never blocks.

        Raises:
            ClientClosedError: the intake is closed.
        """
        if self.state is _OPEN:  # the common case first, on the hot path
            queue = self.queue
            if len(queue) < self._max_size and self.bytes + size <= self._max_bytes:
                queue.append(item)
                self.bytes += size
                if self.state is not _OPEN:
                    self._retract(item)  # closed by another thread since the check above
                if len(queue) >= self.wake_at:
                    self._wake()
                return
        self._put_slowly(item, size)

    def put_identify(self, item: ev.Item, size: int) -> None:
        """:meth:`put` for an identify, counted apart from tracks once taken (queued, or
        dropped by the overflow policy); a disabled client takes nothing."""
        self.put(item, size)
        if self.state is not _DISABLED:
            self._ledger.count_identify()

    def _put_slowly(self, item: ev.Item, size: int) -> None:
        """:meth:`put` when the intake is not open or a bound is reached."""
        if self.state is not _OPEN:
            if self.state is _CLOSED:
                raise ClientClosedError(CLOSED_MESSAGE)
            return  # disabled
        if self._make_room(item, size):
            self.put(item, size)

    def _make_room(self, item: ev.Item, size: int) -> bool:
        """Apply the overflow policy; False when ``item`` itself is the one dropped."""
        if self._drop_newest or size > self._max_bytes:
            self._dropped(item, queued=False)
            return False
        with self.lock:
            queue = self.queue
            while queue and (len(queue) >= self._max_size or self.bytes + size > self._max_bytes):
                oldest = queue.popleft()
                self.head += 1
                self.bytes -= item_bytes(oldest)
                self._dropped(oldest, queued=True)
            if not queue:
                self.bytes = 0
        return True

    def _dropped(self, item: ev.Item, *, queued: bool) -> None:
        if self.spill is not None and item[1] is not None:  # identifies are never spooled
            self.spill(item, queued)
        elif self._ledger.drop_at_capture("queue_overflow", item[4], queued=queued):
            self._wake()

    def _retract(self, item: ev.Item) -> None:
        with self.lock:
            self._ahead.clear()  # the queue changes in the middle, not at its head
            try:
                self.queue.remove(item)
            except ValueError:
                return  # closing took it already: it is delivered or reported like the rest
            self.bytes -= item_bytes(item)
        raise ClientClosedError(CLOSED_MESSAGE)

    def close(self) -> None:
        """Take no more events (idempotent)."""
        if self.state is _OPEN:
            self.state = _CLOSED

    def take(
        self, *, max_size: int, max_bytes: int, base_context: bytes, now: float
    ) -> Batch | None:
        """The next batch off the front (see :func:`take_batch`), or None."""
        with self.lock:
            ahead = self._ahead
            batch, taken = take_batch(
                self.queue,
                self.head,
                max_size=max_size,
                max_bytes=max_bytes,
                base_context=base_context,
                now=now,
                ledger=self._ledger,
                ahead=ahead.bodies if ahead.position == self.head else (),
            )
            ahead.clear()
            self.head += taken
            if not self.queue:
                self.bytes = 0
            elif batch is not None:  # events dropped by take_batch stay counted until empty
                self.bytes -= bytes_of(batch.items)
        return batch

    def encode_ahead(self, *, max_size: int, max_bytes: int, base_context: bytes) -> bool:
        """Encode one step of the next batch ahead of its take (see :class:`Ahead`); True
        while steps remain. Only for a backlog (two batches or more queued): a steady flow of
        about one batch is taken in one step as before, where a turn more costs more than it
        spares."""
        if len(self.queue) < 2 * max_size:  # the common case, without the lock
            return False
        with self.lock:
            return self._ahead.step(
                self.queue,
                self.head,
                max_size=max_size,
                max_bytes=max_bytes,
                tail=ev.context_tail(base_context),
            )

    def drain(self) -> list[ev.Item]:
        """Everything queued, taken at once (at close, to be reported)."""
        with self.lock:
            self._ahead.clear()
            items = list(self.queue)
            self.queue.clear()
            self.head += len(items)
            self.bytes = 0
        return items

    def identify_first(self) -> bool:
        """Whether the next message is an identify (which goes alone, as a barrier)."""
        queue = self.queue
        return bool(queue) and queue[0][1] is None


def item_bytes(item: ev.Item) -> int:
    """What a queued message counts against ``max_queue_bytes``: its encoded parts."""
    return len(item[3]) + (len(item[5]) if len(item) > 5 else 0)


def bytes_of(items: list[ev.Item]) -> int:
    """``item_bytes`` summed, with C loops for the common items without a context."""
    total = sum(map(len, map(_PROPERTIES, items)))
    if max(map(len, items), default=0) > 5:
        total += sum(len(item[5]) for item in items if len(item) > 5)
    return total
