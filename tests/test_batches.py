"""Batch assembly at its byte limit (an internal invariant the public API cannot reach exactly)."""

from __future__ import annotations

from collections import deque

from whisperr import _events
from whisperr._batches import take_batch
from whisperr._ledger import Ledger

BASE = _events.encode_base_context({"sdk_name": "test"})
NOW = 1_781_438_400.0


def item(padding: int) -> _events.Item:
    return ("u", "a_b", NOW, b'{"p":"' + b"x" * padding + b'"}', "m")


def test_an_event_that_fills_the_request_exactly_is_taken() -> None:
    """An event whose batch body is exactly max_bytes is sent alone, not pushed back forever."""
    limit = 4096
    bare = len(_events.batch_body([_events.encode_event(item(0), BASE)]))
    queue = deque([item(limit - bare), item(0)])
    batch, taken = take_batch(
        queue, 0, max_size=500, max_bytes=limit, base_context=BASE, now=NOW, ledger=Ledger(None)
    )
    assert batch is not None
    assert len(_events.batch_body(batch.bodies)) == limit
    assert (len(batch.items), taken, len(queue)) == (1, 1, 1)


def test_an_event_one_byte_too_large_is_dropped_and_reported() -> None:
    """An event whose body alone exceeds max_bytes is dropped with reason payload_too_large."""
    limit = 4096
    bare = len(_events.batch_body([_events.encode_event(item(0), BASE)]))
    ledger = Ledger(None)
    queue = deque([item(limit - bare + 1)])
    batch, taken = take_batch(
        queue, 0, max_size=500, max_bytes=limit, base_context=BASE, now=NOW, ledger=ledger
    )
    assert (batch, taken) == (None, 1)
    assert ledger.dropped == {"payload_too_large": 1}
