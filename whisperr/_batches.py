"""Batches: how the queue's front becomes one request, encoded once and kept whole on retries."""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import accumulate, islice
from operator import itemgetter

import attrs

from . import _events as ev
from ._ledger import Ledger

# Bytes of the batch envelope around the events: `{"events":[` and `]}`.
_ENVELOPE = len(ev.batch_body([]))
_EVENT_TYPE, _STAMP, _PROPERTIES = itemgetter(1), itemgetter(2), itemgetter(3)
# Events encoded ahead in one step of the runner (about 0.2 ms): a full batch takes two.
ENCODE_STEP = 250


@attrs.define(eq=False)
class Batch:
    """Events that travel in one request.

    ``first`` is the queue position (counted since the client was made) of its first event,
    which ``flush()`` compares with its target; ``retained_round`` is the flush round in which
    it was last kept after a failure, ``failure`` the reason it would be dropped with and
    ``last_failure`` what its last attempt met. ``half``: split from a batch answered 413.
    ``spooled``: its events are in the spool file (replayed, or journaled with
    ``spool_mode="always"``), to be deleted from it once settled.
    """

    items: list[ev.Item]
    bodies: list[bytes]
    identify: bool
    first: int
    retained_round: int = -1
    failure: str = "shutdown"
    last_failure: str = ""
    half: bool = False
    spooled: bool = False

    @property
    def message_ids(self) -> tuple[str, ...]:
        return tuple(item[4] for item in self.items if item[4])

    @property
    def body_size(self) -> int:
        """Bytes of its request's body: the envelope and the events, or an identify alone."""
        if self.identify:
            return len(self.bodies[0])
        return _ENVELOPE + sum(map(len, self.bodies)) + len(self.bodies) - 1

    def halves(self) -> tuple[Batch, Batch]:
        """The batch split in two, for a server that answered 413."""
        mid, first = len(self.items) // 2, self.first
        items, bodies = self.items, self.bodies
        spooled = self.spooled
        return (
            Batch(items[:mid], bodies[:mid], False, first, half=True, spooled=spooled),
            Batch(items[mid:], bodies[mid:], False, first + mid, half=True, spooled=spooled),
        )

    def cut(self, max_bytes: int) -> list[Batch]:
        """The batch in pieces of at most ``max_bytes`` of body each, in order; an event larger
        than that alone is a piece alone."""
        ends = list(accumulate(len(body) + 1 for body in self.bodies))  # each with its comma
        room = max_bytes - _ENVELOPE + 1
        pieces: list[Batch] = []
        start = used = 0
        while start < len(ends):
            end = max(bisect_right(ends, used + room, start), start + 1)
            pieces.append(
                Batch(
                    self.items[start:end],
                    self.bodies[start:end],
                    identify=False,
                    first=self.first + start,
                    spooled=self.spooled,
                )
            )
            used = ends[end - 1]
            start = end
        return pieces


@attrs.define(eq=False)
class Ahead:
    """The queue's front, encoded ahead of the take that makes it a batch, a step at a time.

    Encoding a batch of 500 events at once holds the event loop for about half a millisecond;
    in steps of ``ENCODE_STEP`` events the app's own tasks run between two. The events stay in
    the queue meanwhile (flush positions, overflow and close see them there as before), and the
    bodies serve a take only while the queue's front is still at ``position`` (the intake's
    ``head``), that is while the same events lead it.
    """

    position: int = -1
    bodies: list[bytes] = attrs.Factory(list)
    size: int = 0  # the bodies' bytes, each with a comma

    def step(
        self, queue: deque[ev.Item], position: int, *, max_size: int, max_bytes: int, tail: bytes
    ) -> bool:
        """Encode the next step of the batch the queue's front (at ``position``) would make.

        True when a step was encoded and the batch is not ready yet: the caller yields, then
        steps again. False when the take can encode the rest at once (at most one step's worth),
        or when something at the front needs the take's own checks (an identify, an event that
        cannot be encoded, a byte limit reached), or the front moved (an overflow dropped it).
        """
        if position != self.position:
            moved = bool(self.bodies)
            self.clear()
            self.position = position
            if moved:
                return False  # the take starts over, once: an overflow never keeps it waiting
        done = len(self.bodies)
        if len(queue) - done <= ENCODE_STEP or max_size - done <= ENCODE_STEP:
            return False
        try:
            chunk = list(islice(queue, done, done + ENCODE_STEP))
        except RuntimeError:  # track() in another thread appended meanwhile
            return False
        if None in map(_EVENT_TYPE, chunk):
            return False  # an identify goes alone: the take's own path
        # What the request has room for, each event with its comma (as in take_batch); the
        # properties are a lower bound of what an event's body takes.
        room = max_bytes - _ENVELOPE + 1
        if self.size + sum(map(len, map(_PROPERTIES, chunk))) + len(chunk) > room:
            return False  # the take cuts the batch by bytes
        encode = ev.encode_event
        try:
            bodies = [encode(item, tail) for item in chunk]
        except TypeError:  # a lone surrogate: the take drops it and reports it
            return False
        self.bodies += bodies
        self.size += sum(map(len, bodies)) + len(bodies)
        return self.size <= room  # else the take cuts what is encoded: no step more

    def clear(self) -> None:
        self.position, self.bodies, self.size = -1, [], 0


def take_batch(
    queue: deque[ev.Item],
    position: int,
    *,
    max_size: int,
    max_bytes: int,
    base_context: bytes,
    now: float,
    ledger: Ledger,
    ahead: Sequence[bytes] = (),
) -> tuple[Batch | None, int]:
    """Take one identify alone, or a run of tracks, off the front of the queue.

    Tracks already older than the server's 30-day window, too large alone, or impossible to
    encode are dropped (and reported) instead. Returns the batch (None if nothing was taken or
    everything taken was dropped) and how many items left the queue. The caller holds the lock
    that other threads take to pop the queue; they may append to it meanwhile. ``ahead``: the
    bodies of the queue's first events, already encoded (see :class:`Ahead`).
    """
    if not queue:  # emptied by another thread since the caller looked
        return None, 0
    if queue[0][1] is None:
        first = queue.popleft()
        return Batch([first], [first[3]], identify=True, first=position), 1
    oldest = now - ev.MAX_PAST + 60.0
    tail = ev.context_tail(base_context)
    encode, take = ev.encode_event, queue.popleft
    # What the events may take of a request: each its length and a comma, except that the first
    # has no comma (hence the + 1).
    room = max_bytes - _ENVELOPE + 1
    # The common case, its per-event checks done by C loops: up to max_size tracks with no
    # identify among them and none expired; as many as fit in max_bytes go.
    try:
        front = list(islice(queue, max_size))
    except RuntimeError:  # track() in another thread appended between islice() and list()
        front = []  # the per-event loop below takes this batch
    if front and None not in map(_EVENT_TYPE, front) and min(map(_STAMP, front)) >= oldest:
        # Each body is longer than its properties: encode no more events than could fit.
        if sum(map(len, map(_PROPERTIES, front))) + len(front) > room:
            front = front[: max(_fitting(map(len, map(_PROPERTIES, front)), room), 1)]
        try:
            encoded = [encode(item, tail) for item in (front[len(ahead) :] if ahead else front)]
        except TypeError:  # orjson: a lone surrogate in a user or message id
            encoded = []
        else:
            encoded[:0] = ahead[: len(front)]
        fit = len(encoded)
        if sum(map(len, encoded)) + fit > room:
            fit = _fitting(map(len, encoded), room)
        if fit:  # else the first event is too large alone: the loop below drops it
            for _ in range(fit):
                take()
            return Batch(front[:fit], encoded[:fit], identify=False, first=position), fit
    items: list[ev.Item] = []
    bodies: list[bytes] = []
    used, taken = 0, 0
    while queue and len(items) < max_size:
        item = queue[0]
        if item[1] is None:
            break  # an identify: it goes alone, after this batch
        if item[2] < oldest:
            take()
            taken += 1
            ledger.drop([item], "expired", "older than the server's 30-day window")
            continue
        try:
            body = encode(item, tail)
        except TypeError as exc:  # unencodable (lone surrogate): never sendable
            take()
            taken += 1
            ledger.drop([item], "invalid", f"cannot be encoded: {exc}")
            continue
        if used + len(body) + 1 > room:
            if items:
                break  # it starts the next batch
            take()
            taken += 1
            ledger.drop([item], "payload_too_large", "larger than max_batch_bytes")
            continue
        take()
        taken += 1
        items.append(item)
        bodies.append(body)
        used += len(body) + 1
    return (Batch(items, bodies, identify=False, first=position) if items else None), taken


def _fitting(sizes: Iterable[int], room: int) -> int:
    """How many of the leading ``sizes`` fit in ``room``, each taking one byte more (a comma)."""
    return bisect_right(list(accumulate(size + 1 for size in sizes)), room)
