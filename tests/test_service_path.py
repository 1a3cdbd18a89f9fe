"""What a service feels: the runner shares the event loop in small steps, and no batch work
happens on the caller's track() path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import whisperr
from whisperr import _events
from whisperr._batches import ENCODE_STEP
from whisperr._schedule import Scheduler

from .conftest import Api

pytestmark = pytest.mark.anyio


async def drain_beside(client: whisperr.AsyncClient, ticker: Callable[[], Awaitable[None]]) -> None:
    """Flush and close ``client`` while ``ticker`` runs as another task of the loop."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        assert (await client.flush()).timed_out is False
        tg.cancel_scope.cancel()
    await client.aclose()


async def test_the_runner_lets_other_tasks_run_between_two_batches(
    api: Api, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep queue goes out one batch per step of the runner: between two batches it takes,
    another task of the loop gets a turn (before, one step took up to max_concurrency)."""
    ticks = 0
    seen_at: list[int] = []
    ready_batch = Scheduler.ready_batch

    def recording(self: Scheduler, now: float, closing: bool = False) -> Any:
        batch = ready_batch(self, now, closing)
        if batch is not None:
            seen_at.append(ticks)
        return batch

    monkeypatch.setattr(Scheduler, "ready_batch", recording)
    client = whisperr.AsyncClient(**settings, max_batch_size=100, max_concurrency=16)
    for i in range(2_000):  # 20 batches, queued before the runner's first step
        client.track("u", "payment_failed", {"i": i})

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    await drain_beside(client, ticker)
    assert len(api.events) == 2_000
    assert len(seen_at) == 20
    assert len(set(seen_at)) == len(seen_at), f"batches taken within one step: {seen_at}"


async def test_no_step_of_the_runner_encodes_a_whole_batch(
    api: Api, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a backlog (two batches or more) drains, its batches of 500 are encoded in steps
    of ENCODE_STEP events: another task of the loop gets a turn between two (before, one step
    encoded the whole batch). The last batch, alone in the queue, goes in one step."""
    encoded = 0
    encode = _events.encode_event

    def counting(event: _events.Item, tail: bytes) -> bytes:
        nonlocal encoded
        encoded += 1
        return encode(event, tail)

    monkeypatch.setattr(_events, "encode_event", counting)
    client = whisperr.AsyncClient(**settings, max_batch_size=500, max_concurrency=16)
    for i in range(2_000):  # 4 batches, queued before the runner's first step
        client.track("u", "payment_failed", {"i": i})
    per_turn: list[int] = []

    async def ticker() -> None:
        seen = 0
        while True:
            per_turn.append(encoded - seen)
            seen = encoded
            await anyio.lowlevel.checkpoint()

    await drain_beside(client, ticker)
    assert len(api.events) == 2_000
    assert encoded == 2_000  # each event once
    assert [n for n in per_turn if n > ENCODE_STEP] == [500], per_turn
    assert per_turn.count(ENCODE_STEP) == 6  # three batches in two steps each


def test_a_caller_that_finds_the_id_pool_empty_makes_a_few_ids_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []
    fresh = _events._fresh_ids

    def counting(count: int) -> list[str]:
        made.append(count)
        return fresh(count)

    monkeypatch.setattr(_events, "_fresh_ids", counting)
    _events.ready_ids.clear()
    ids = {_events.new_message_id() for _ in range(40)}
    assert len(ids) == 40
    assert made
    assert max(made) <= 16, made  # never a bulk refill on a caller's path


async def test_the_runner_tops_the_id_pool_up_off_the_callers_path(
    settings: dict[str, Any],
) -> None:
    _events.ready_ids.clear()
    client = whisperr.AsyncClient(**settings)
    client.track("u", "payment_failed")
    assert len(_events.ready_ids) < 16  # the caller made a few
    await client.flush()  # the runner ran
    assert len(_events.ready_ids) >= _events._RUNNER_REFILL
    await client.aclose()
