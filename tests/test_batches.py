"""Batch assembly at its byte limit (an internal invariant the public API cannot reach exactly),
and a deep queue's batch encoded ahead of its take, a step at a time."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import pytest

from whisperr import _events
from whisperr._batches import ENCODE_STEP, take_batch
from whisperr._intake import Intake
from whisperr._ledger import Ledger

BASE = _events.encode_base_context({"sdk_name": "test"})
NOW = 1_781_438_400.0


def item(padding: int) -> _events.Item:
    return ("u", "a_b", NOW, b'{"p":"' + b"x" * padding + b'"}', "m")


def test_an_event_that_fills_the_request_exactly_is_taken() -> None:
    """An event whose batch body is exactly max_bytes is sent alone, not pushed back forever."""
    limit = 4096
    bare = len(_events.batch_body([_events.encode_event(item(0), _events.context_tail(BASE))]))
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
    bare = len(_events.batch_body([_events.encode_event(item(0), _events.context_tail(BASE))]))
    ledger = Ledger(None)
    queue = deque([item(limit - bare + 1)])
    batch, taken = take_batch(
        queue, 0, max_size=500, max_bytes=limit, base_context=BASE, now=NOW, ledger=ledger
    )
    assert (batch, taken) == (None, 1)
    assert ledger.dropped == {"payload_too_large": 1}


def drain(queue: deque[_events.Item], limit: int, ledger: Ledger) -> list[list[_events.Item]]:
    batches = []
    while queue:
        batch, _ = take_batch(
            queue, 0, max_size=500, max_bytes=limit, base_context=BASE, now=NOW, ledger=ledger
        )
        if batch is not None:
            assert len(_events.batch_body(batch.bodies)) <= limit
            batches.append(batch.items)
    return batches


def test_batches_are_as_full_as_the_byte_limit_allows_and_keep_the_order() -> None:
    events = [item(n % 37) for n in range(300)]
    limit = 4096
    batches = drain(deque(events), limit, Ledger(None))
    assert [e for b in batches for e in b] == events
    tail = _events.context_tail(BASE)
    for this, following in itertools.pairwise(batches):
        bodies = [_events.encode_event(e, tail) for e in [*this, following[0]]]
        assert len(_events.batch_body(bodies)) > limit  # the next event would not have fit


def test_batches_hold_at_most_max_size_events() -> None:
    assert [len(b) for b in drain(deque([item(0)] * 1200), 1_000_000, Ledger(None))] == [
        500,
        500,
        200,
    ]


def test_identifies_go_alone_and_expired_events_are_dropped_in_place() -> None:
    ledger = Ledger(None)
    expired = ("u", "a_b", NOW - _events.MAX_PAST, b"{}", "old")
    identify = ("u", None, NOW, b'{"external_user_id":"u"}', "")
    queue = deque([item(1), expired, item(2), identify, item(3), item(4)])
    batches = drain(queue, 1_000_000, ledger)
    assert batches == [[item(1), item(2)], [identify], [item(3), item(4)]]
    assert ledger.dropped == {"expired": 1}


def test_an_empty_queue_gives_nothing() -> None:
    """Another thread may empty the queue between the runner's look and its take."""
    assert take_batch(
        deque(), 0, max_size=500, max_bytes=4096, base_context=BASE, now=NOW, ledger=Ledger(None)
    ) == (None, 0)


def test_an_item_that_cannot_be_encoded_is_dropped_not_stuck_at_the_head() -> None:
    ledger = Ledger(None)
    poison = ("user_\ud800", "a_b", NOW, b"{}", "bad")  # capture refuses this; still never stuck
    assert drain(deque([item(1), poison, item(2)]), 1_000_000, ledger) == [[item(1), item(2)]]
    assert ledger.dropped == {"invalid": 1}


def test_large_events_are_encoded_only_as_far_as_they_can_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    encode = _events.encode_event

    def counting(event: _events.Item, tail: bytes) -> bytes:
        calls.append(event)
        return encode(event, tail)

    monkeypatch.setattr(_events, "encode_event", counting)
    queue = deque([item(100_000)] * 500)
    batch, taken = take_batch(
        queue, 0, max_size=500, max_bytes=1_000_000, base_context=BASE, now=NOW, ledger=Ledger(None)
    )
    assert batch is not None
    assert taken == len(batch.items) == 9  # 9 x 100 kB fit in 1 MB
    assert len(calls) <= 10


class RacingDeque(deque[_events.Item]):
    """A deque whose first iteration fails as if another thread appended during it."""

    raced = False

    def __iter__(self) -> Iterator[_events.Item]:
        if not self.raced:
            self.raced = True
            raise RuntimeError("deque mutated during iteration")
        return super().__iter__()


def test_a_queue_appended_to_while_it_is_read_still_gives_its_batch() -> None:
    queue = RacingDeque([item(1), item(2)])
    batch, taken = take_batch(
        queue, 0, max_size=500, max_bytes=1_000_000, base_context=BASE, now=NOW, ledger=Ledger(None)
    )
    assert queue.raced
    assert batch is not None
    assert (batch.items, taken, len(queue)) == ([item(1), item(2)], 2, 0)


# -- encoding ahead ---------------------------------------------------------------------------


def make_intake(items: list[_events.Item], max_size: int = 10_000) -> Intake:
    intake = Intake(
        max_size=max_size, max_bytes=10**9, drop_newest=False, ledger=Ledger(None),
        wake=lambda: None, disabled=False,
    )  # fmt: skip
    for event in items:
        intake.put(event, len(event[3]))
    return intake


def take_all(intake: Intake, *, stepped: bool, max_bytes: int) -> list[tuple[list, list]]:
    """Every batch the intake gives, as (items, bodies); ``stepped``: encoded ahead first, as
    the runner does."""
    batches = []
    while len(intake):
        while stepped and intake.encode_ahead(max_size=500, max_bytes=max_bytes, base_context=BASE):
            pass
        batch = intake.take(max_size=500, max_bytes=max_bytes, base_context=BASE, now=NOW)
        if batch is not None:
            batches.append((batch.items, batch.bodies))
    return batches


@pytest.mark.parametrize("max_bytes", [1_000_000, 20_000])
def test_batches_encoded_ahead_are_the_batches_taken_at_once(max_bytes: int) -> None:
    """Tracks of many sizes, an identify, an expired event and one that cannot be encoded, in a
    queue deep enough to be encoded ahead: the same batches, the same bodies, either way."""
    events = [item(n % 97) for n in range(4_000)]
    events[700] = ("u", None, NOW, b'{"external_user_id":"u"}', "")  # an identify
    events[1300] = ("u", "a_b", NOW - _events.MAX_PAST, b"{}", "old")  # expired
    events[2100] = ("user_\ud800", "a_b", NOW, b"{}", "bad")  # cannot be encoded
    at_once = take_all(make_intake(events), stepped=False, max_bytes=max_bytes)
    stepped = take_all(make_intake(events), stepped=True, max_bytes=max_bytes)
    assert stepped == at_once
    assert len(at_once) > 8


def test_about_one_batch_queued_is_not_encoded_ahead() -> None:
    """A steady flow (less than two batches queued) is taken in one step, as it comes."""
    intake = make_intake([item(0) for _ in range(999)])
    assert not intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)
    intake.put(item(0), 10)
    assert intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)


def test_a_batch_encoded_ahead_encodes_each_event_once_and_in_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded: list[int] = []
    encode = _events.encode_event

    def counting(event: _events.Item, tail: bytes) -> bytes:
        encoded.append(1)
        return encode(event, tail)

    monkeypatch.setattr(_events, "encode_event", counting)
    intake = make_intake([item(n % 10) for n in range(1_000)])  # two batches: a backlog
    steps = []
    while intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE):
        steps.append(len(encoded))
    batch = intake.take(max_size=500, max_bytes=1_000_000, base_context=BASE, now=NOW)
    assert batch is not None
    assert len(batch.items) == 500
    assert steps == [ENCODE_STEP]  # 250 ahead, the take the other 250
    assert len(encoded) == 500


def test_an_overflow_after_encoding_ahead_makes_the_take_encode_again() -> None:
    """drop_oldest from a caller's thread pops the front that was encoded ahead: the take
    must not pair those bodies with the events now at the front."""
    events = [item(n % 50) for n in range(1_200)]
    intake = make_intake(events, max_size=1_200)
    assert intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)
    intake.put(item(0), 10)  # full: the oldest is dropped
    batch = intake.take(max_size=500, max_bytes=1_000_000, base_context=BASE, now=NOW)
    assert batch is not None
    assert batch.items == events[1:501]
    tail = _events.context_tail(BASE)
    assert batch.bodies == [_events.encode_event(e, tail) for e in batch.items]


def test_after_an_overflow_the_next_step_leaves_the_take_to_encode() -> None:
    """Overflow on every put would otherwise keep restarting the steps, and the take waiting."""
    intake = make_intake([item(n % 50) for n in range(1_200)], max_size=1_200)
    assert intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)
    intake.put(item(0), 10)  # full: the oldest is dropped
    assert not intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)
    assert intake.encode_ahead(max_size=500, max_bytes=1_000_000, base_context=BASE)  # afresh
