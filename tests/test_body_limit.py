"""The server's body limit, learned after a 413: batches are cut to the largest body it took, the
user is told once, and max_batch_bytes is tried again after a while.

The policy is driven with an injected ``now`` against a server that refuses bodies above a
limit; the end-to-end test runs the public client over an ``httpx.MockTransport`` with the
runner's monotonic clock moved by hand.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import attrs
import httpx
import orjson
import pytest

import whisperr
import whisperr._runner
from whisperr import _events as ev
from whisperr._batches import Batch
from whisperr._intake import Intake
from whisperr._ledger import Ledger
from whisperr._schedule import RETRY_WHOLE_AFTER, BodyLimit, Scheduler
from whisperr._transport import Outcome

from .conftest import NOW
from .test_core import make_scheduler as core_scheduler

OK = Outcome("ok", "ok", "delivered", 202)
TOO_LARGE = Outcome("too_large", "payload_too_large", "the server answered 413", 413)
PAD = b"x" * 80


def track(n: int, first: int = 0, pad: bytes = PAD) -> list[ev.Item]:
    """``n`` tracks of one size (the ids have a fixed width)."""
    return [("u", "a_b", NOW, b'{"p":"%b"}' % pad, f"id-{first + i:06d}") for i in range(n)]


EVENT = len(ev.encode_event(track(1)[0], ev.context_tail(b"{}")))
ENVELOPE = len(ev.batch_body([]))


def body(events: int) -> int:
    """The body size of a batch of ``events`` tracks from :func:`track`."""
    return len(ev.batch_body([b"e" * EVENT] * events))


def make_scheduler(**overrides: Any) -> tuple[Scheduler, Intake, Ledger]:
    return core_scheduler(max_queue=100_000, max_batch_size=100, **overrides)


@attrs.define
class Sent:
    """What a server that refuses bodies above ``limit`` bytes saw of one burst."""

    sizes: list[int] = attrs.field(factory=list)
    refused: int = 0


def burst(
    scheduler: Scheduler, intake: Intake, items: list[ev.Item], limit: int, now: float
) -> Sent:
    """Queue ``items``, flush them, answer 413 above ``limit``: every batch ready is sent before
    the answers of the round come (the way concurrent requests meet a first 413)."""
    for item in items:
        intake.put(item, len(item[3]))
    scheduler.barriers.add(intake.end)
    sent = Sent()
    while True:
        batches = []
        while (batch := scheduler.ready_batch(now)) is not None:
            batches.append(batch)
        if not batches:
            return sent
        for batch in batches:
            size = batch.body_size
            sent.sizes.append(size)
            if size > limit:
                sent.refused += 1
            scheduler.settle(batch, TOO_LARGE if size > limit else OK, now)


# -- the body of a batch and its pieces --------------------------------------------------------


def test_body_size_is_the_request_body() -> None:
    bodies = [b'{"a":1}', b'{"b":22}', b"{}"]
    batch = Batch(track(3), bodies, identify=False, first=0)
    assert batch.body_size == len(ev.batch_body(bodies))
    identify = Batch([("u", None, NOW, b'{"external_user_id":"u"}', "")], [b"{}"], True, 0)
    assert identify.body_size == 2  # an identify is sent alone, without the envelope


TWO_OF_10 = len(ev.batch_body([b"e" * 10] * 2))  # the body of two events of 10 bytes


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "expected"),
    [
        ([10, 10, 10, 10], 1000, [[10, 10, 10, 10]]),  # fits whole
        ([10, 10, 10, 10], TWO_OF_10, [[10, 10], [10, 10]]),  # exactly max_bytes
        ([10, 10, 10, 10], TWO_OF_10 - 1, [[10], [10], [10], [10]]),
        ([10, 500, 10, 10], TWO_OF_10, [[10], [500], [10, 10]]),  # the large one alone
    ],
)
def test_cut_keeps_order_and_sends_a_large_event_alone(
    sizes: list[int], max_bytes: int, expected: list[list[int]]
) -> None:
    items = track(len(sizes))
    batch = Batch(items, [b"e" * n for n in sizes], identify=False, first=7)
    pieces = batch.cut(max_bytes)
    assert [[len(b) for b in p.bodies] for p in pieces] == expected
    assert [item for p in pieces for item in p.items] == items
    assert [p.first for p in pieces] == [
        7 + sum(map(len, expected[:i])) for i in range(len(pieces))
    ]
    assert all(p.body_size <= max_bytes or len(p.items) == 1 for p in pieces)


# -- what the answers teach ----------------------------------------------------------------------


def sized(size: int, *, half: bool = False) -> Batch:
    """A batch of two events whose body is ``size`` bytes."""
    room = size - len(ev.batch_body([b"", b""]))
    bodies = [b"e" * (room // 2), b"e" * (room - room // 2)]
    return Batch(track(2), bodies, identify=False, first=0, half=half)


LEARNED = [("413", 10_000, False), ("ok", 5_000, True)]


@pytest.mark.parametrize(
    ("answers", "refused", "fits"),
    [
        ([("ok", 50_000, False)], None, None),  # nothing refused: nothing to learn
        ([("413", 10_000, False)], 10_000, None),  # refused, nothing known to fit yet
        ([("413", 10_000, False), ("ok", 300, False)], 10_000, None),  # a small batch: nothing
        (LEARNED, 10_000, 5_000),  # a half of a refused batch delivered: learned
        ([("413", 10_000, False), ("413", 8_000, True), ("ok", 4_000, True)], 8_000, 4_000),
        ([*LEARNED, ("ok", 6_000, False)], 10_000, 6_000),  # any body delivered below refused
        ([*LEARNED, ("ok", 4_000, True)], 10_000, 5_000),  # the largest one
        ([*LEARNED, ("413", 9_000, False)], 9_000, 5_000),  # the limit is between them
        ([*LEARNED, ("ok", 10_000, False)], None, None),  # it took what it refused: forgotten
        ([*LEARNED, ("413", 5_000, False)], 5_000, None),  # it takes less now: learn again
        ([*LEARNED, ("413", 5_000, False), ("ok", 2_500, True)], 5_000, 2_500),
    ],
)
def test_what_the_answers_teach(
    answers: list[tuple[str, int, bool]], refused: int | None, fits: int | None
) -> None:
    limit = BodyLimit(1_000_000)
    for kind, size, half in answers:
        if kind == "413":
            limit.too_large(sized(size, half=half))
        else:
            limit.delivered(sized(size, half=half), 0.0)
    assert (limit.refused, limit.fits) == (refused, fits)


def test_a_413_after_learning_cuts_to_the_limit_at_once() -> None:
    """Before a limit is known a refused batch is halved; after, it is cut to the limit."""
    limit = BodyLimit(1_000_000)
    big = Batch(track(40), [b"e" * 100] * 40, identify=False, first=0)
    halves = limit.too_large(big)
    assert [(len(p.items), p.half) for p in halves] == [(20, True), (20, True)]
    limit.delivered(halves[1], 0.0)
    assert limit.fits == halves[1].body_size
    larger = Batch(track(70), [b"e" * 100] * 70, identify=False, first=0)
    pieces = limit.too_large(larger)
    assert [(len(p.items), p.half) for p in pieces] == [(20, False)] * 3 + [(10, False)]


@pytest.mark.parametrize(
    ("now", "events", "pieces"),
    [
        (0.0, 10, [10]),  # at or below the limit: whole, and the try is not used up
        (0.0, 25, [10, 10, 5]),  # cut to the limit
        (RETRY_WHOLE_AFTER - 0.001, 25, [10, 10, 5]),
        (RETRY_WHOLE_AFTER, 25, [25]),  # the period passed: whole, once
    ],
)
def test_batches_taken_are_cut_and_tried_whole_after_the_period(
    now: float, events: int, pieces: list[int]
) -> None:
    limit = BodyLimit(1_000_000, refused=body(20), fits=body(10), retry_whole_at=RETRY_WHOLE_AFTER)
    batch = Batch(track(events), [b"e" * EVENT] * events, identify=False, first=0)
    assert [len(p.items) for p in limit.pieces(batch, now)] == pieces
    larger = Batch(track(25), [b"e" * EVENT] * 25, identify=False, first=0)
    assert [len(p.items) for p in limit.pieces(larger, now)] == [10, 10, 5]  # the next is cut


def test_a_lone_event_larger_than_the_limit_is_not_cut_or_dropped() -> None:
    limit = BodyLimit(1_000_000, refused=body(20), fits=body(10), retry_whole_at=1e9)
    lone = Batch(track(1), [b"e" * body(15)], identify=False, first=0)
    assert limit.pieces(lone, 0.0) == [lone]


# -- the scheduler against a limited server --------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 16])
def test_learned_after_the_first_burst_then_no_more_413s(concurrency: int) -> None:
    scheduler, intake, ledger = make_scheduler(max_concurrency=concurrency)
    limit = body(30)
    first = burst(scheduler, intake, track(100), limit, now=0.0)
    # 100 refused, halves of 50 refused, quarters of 25 delivered.
    assert first.refused == 3
    assert scheduler.body_limit.fits == body(25)
    later = burst(scheduler, intake, track(1000, first=100), limit, now=1.0)
    assert later.refused == 0
    assert max(later.sizes) == body(25)
    assert len(later.sizes) == 40  # 1,000 events in pieces of 25
    assert ledger.delivered == 1100
    assert not ledger.dropped


def test_tried_whole_after_the_period_and_forgotten_when_it_fits() -> None:
    scheduler, intake, _ = make_scheduler(max_concurrency=1)
    burst(scheduler, intake, track(100), body(30), now=0.0)
    assert scheduler.body_limit.fits == body(25)
    before = burst(scheduler, intake, track(100, 100), body(30), now=RETRY_WHOLE_AFTER - 1)
    assert (before.refused, before.sizes) == (0, [body(25)] * 4)
    # The period passed: one batch goes whole, is refused and cut to the limit at once.
    tried = burst(scheduler, intake, track(200, 200), body(30), now=RETRY_WHOLE_AFTER)
    assert tried.refused == 1
    assert tried.sizes == [body(100)] + [body(25)] * 8
    assert scheduler.body_limit.fits == body(25)
    # The next try is a period after that one; meanwhile the server's limit was raised.
    again = burst(scheduler, intake, track(100, 400), body(500), now=2 * RETRY_WHOLE_AFTER - 1)
    assert again.sizes == [body(25)] * 4
    raised = burst(scheduler, intake, track(200, 500), body(500), now=2 * RETRY_WHOLE_AFTER)
    assert (raised.refused, raised.sizes) == (0, [body(100)] * 2)
    assert scheduler.body_limit.fits is None


def test_a_lower_limit_is_learned_again() -> None:
    scheduler, intake, ledger = make_scheduler()
    burst(scheduler, intake, track(100), body(30), now=0.0)
    assert scheduler.body_limit.fits == body(25)
    lowered = burst(scheduler, intake, track(100, 100), body(10), now=1.0)
    assert lowered.refused > 0
    assert scheduler.body_limit.fits is not None
    assert scheduler.body_limit.fits <= body(10)
    after = burst(scheduler, intake, track(100, 200), body(10), now=2.0)
    assert after.refused == 0
    assert ledger.delivered == 300


def test_a_lone_event_above_the_learned_limit_is_sent_and_dropped_only_by_its_413() -> None:
    scheduler, intake, ledger = make_scheduler()
    burst(scheduler, intake, track(100), body(30), now=0.0)
    fits = scheduler.body_limit.fits
    assert fits == body(25)
    # Events whose batch alone is 28 events large (above fits, below the server's limit of 30)
    # and 40 (above it).
    fitting = track(1, 100, pad=b"y" * (body(28) - ENVELOPE - EVENT + len(PAD)))
    refused = track(1, 101, pad=b"z" * (body(40) - ENVELOPE - EVENT + len(PAD)))
    sent = burst(scheduler, intake, [*track(5, 102), *fitting, *refused], body(30), now=1.0)
    assert sent.sizes == [body(5), body(28), body(40)]  # each large one alone
    assert sent.refused == 1
    assert ledger.delivered == 100 + 6
    assert ledger.dropped == {"payload_too_large": 1}
    assert scheduler.body_limit.fits == body(28)  # it was delivered


# -- end to end --------------------------------------------------------------------------------


@attrs.define
class LimitedServer:
    """An ingestion API behind a proxy that answers 413 to bodies above ``limit`` bytes."""

    limit: int
    answers: list[tuple[int, int]] = attrs.field(factory=list)  # (body size, status)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        size = len(request.content)
        if size > self.limit:
            self.answers.append((size, 413))
            return httpx.Response(413, text="413 Request Entity Too Large")
        self.answers.append((size, 202))
        n = len(orjson.loads(request.content)["events"])
        return httpx.Response(202, json={"accepted": n, "rejected": 0})

    def since(self, mark: int) -> list[tuple[int, int]]:
        return self.answers[mark:]


@attrs.define
class RunnerTime:
    """The runner's ``time`` module: monotonic() moved ahead by ``offset`` seconds."""

    offset: float = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def warnings_about_413(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "whisperr" and r.levelno == logging.WARNING and "413" in r.getMessage()
    ]


@pytest.mark.anyio
async def test_the_client_learns_the_limit_says_so_once_and_tries_again_later(
    settings: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "whisperr")
    server = LimitedServer(64 * 1024)
    runner_time = RunnerTime()
    monkeypatch.setattr(whisperr._runner, "time", runner_time)
    settings["transport"] = httpx.MockTransport(server)
    client = whisperr.AsyncClient(**settings)
    pad = "x" * 240  # about 490 bytes an event: a quarter of 500 fits in 64 KiB, a half not
    tracked = 0

    async def send(n: int) -> list[tuple[int, int]]:
        nonlocal tracked
        mark = len(server.answers)
        for i in range(n):
            client.track("user", "page_viewed", {"pad": pad, "i": i})
        tracked += n
        await client.flush()
        return server.since(mark)

    # 500 events (about 240 kB) meet 413s until their pieces fit; the largest that fit is learned.
    first = await send(500)
    refused = [size for size, status in first if status == 413]
    delivered = [size for size, status in first if status == 202]
    assert len(refused) == 3  # the whole batch, and its halves
    assert len(delivered) == 4
    learned = client.stats().max_batch_bytes_learned
    assert learned == max(delivered)
    assert learned <= server.limit
    [warning] = warnings_about_413(caplog)
    said = re.search(r"body of (\d+) bytes; batches are cut to (\d+) bytes", warning)
    assert said is not None
    assert int(said[1]) in refused[1:]  # the smallest refused when the first quarter came
    assert int(said[2]) in delivered
    assert f"Lower max_batch_bytes (now 1000000) to {said[2]} " in warning

    # Bursts after that are cut to the limit: no more 413s, and no second warning.
    burst_answers = await send(2000)
    assert [status for _, status in burst_answers] == [202] * len(burst_answers)
    assert max(size for size, _ in burst_answers) <= learned
    assert len(warnings_about_413(caplog)) == 1

    # Ten minutes on: one batch tries max_batch_bytes again, is refused and cut at once.
    runner_time.offset += RETRY_WHOLE_AFTER
    tried = await send(500)
    assert [status for _, status in tried].count(413) == 1
    assert tried[0][1] == 413
    assert client.stats().max_batch_bytes_learned == learned
    assert len(warnings_about_413(caplog)) == 1

    # The proxy's limit was raised: the next try fits, the limit is forgotten and said so.
    server.limit = 10 * 1024 * 1024
    runner_time.offset += RETRY_WHOLE_AFTER
    raised = await send(500)
    assert [status for _, status in raised] == [202]
    assert raised[0][0] > min(refused)
    assert client.stats().max_batch_bytes_learned is None
    assert any("batches go up to max_batch_bytes=1000000 again" in m for m in caplog.messages)

    await client.aclose()
    stats = client.stats()
    assert stats.tracked == tracked == 3500
    assert stats.delivered == tracked
    assert stats.dropped == 0
    assert sum(status == 202 for _, status in server.answers) > 0
    assert len(warnings_about_413(caplog)) == 1
