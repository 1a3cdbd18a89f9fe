"""Batches: how the queue's front becomes one request, encoded once and kept whole on retries."""

from __future__ import annotations

from collections import deque

import attrs

from . import _events as ev
from ._ledger import Ledger

# Bytes of the batch envelope around the events: `{"events":[` and `]}`.
_ENVELOPE = len(ev.batch_body([]))


@attrs.define(eq=False)
class Batch:
    """Events that travel in one request.

    ``first`` is the queue position (counted since the client was made) of its first event,
    which ``flush()`` compares with its target; ``retained_round`` is the flush round in which
    it was last kept after a failure, and ``failure`` the reason it would be dropped with.
    """

    items: list[ev.Item]
    bodies: list[bytes]
    identify: bool
    first: int
    retained_round: int = -1
    failure: str = "shutdown"

    @property
    def message_ids(self) -> tuple[str, ...]:
        return tuple(item[4] for item in self.items if item[4])

    def halves(self) -> tuple[Batch, Batch]:
        """The batch split in two, for a server that answered 413."""
        half = len(self.items) // 2
        return (
            Batch(self.items[:half], self.bodies[:half], identify=False, first=self.first),
            Batch(self.items[half:], self.bodies[half:], identify=False, first=self.first + half),
        )


def take_batch(
    queue: deque[ev.Item],
    position: int,
    *,
    max_size: int,
    max_bytes: int,
    base_context: bytes,
    now: float,
    ledger: Ledger,
) -> tuple[Batch | None, int]:
    """Take one identify alone, or a run of tracks, off the front of a non-empty queue.

    Tracks already older than the server's 30-day window, or too large alone, are dropped (and
    reported) instead. Returns the batch (None if everything taken was dropped) and how many
    items left the queue.
    """
    first = queue.popleft()
    if first[1] is None:
        return Batch([first], [first[3]], identify=True, first=position), 1
    oldest = now - ev.MAX_PAST + 60.0
    items: list[ev.Item] = []
    bodies: list[bytes] = []
    size, taken = _ENVELOPE, 1
    item = first
    while True:
        if item[2] < oldest:
            ledger.drop([item], "expired", "older than the server's 30-day window")
        else:
            body = ev.encode_event(item, base_context)
            if len(body) + _ENVELOPE > max_bytes:
                ledger.drop([item], "payload_too_large", "larger than max_batch_bytes")
            elif size + len(body) + bool(items) > max_bytes:  # a comma before all but the first
                queue.appendleft(item)  # it starts the next batch
                taken -= 1
                break
            else:
                items.append(item)
                bodies.append(body)
                size += len(body) + 1
        if len(items) >= max_size or not queue or queue[0][1] is None:
            break
        item = queue.popleft()
        taken += 1
    return (Batch(items, bodies, identify=False, first=position) if items else None), taken
