"""Shared fixtures: a scripted in-memory ingestion API, a fixed clock and a recording sleep."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import anyio
import attrs
import httpx
import orjson
import pytest

API_KEY = "wrk_test_secret_key_0123456789"
NOW = datetime(2026, 6, 14, 12, 0, 0, 123456, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@attrs.define
class Api:
    """An httpx.MockTransport handler that records requests and answers from a script.

    ``script`` holds responses (or exceptions) used in order, one per request; once it runs out,
    every request gets ``default``.
    """

    script: list[httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]] = (
        attrs.field(factory=list)
    )
    default: int = 202
    requests: list[httpx.Request] = attrs.field(factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            if callable(answer):
                return answer(request)
            return answer
        if request.url.path.endswith("/batch"):
            n = len(orjson.loads(request.content)["events"])
            return httpx.Response(self.default, json={"accepted": n, "rejected": 0})
        return httpx.Response(200 if self.default == 202 else self.default, json={"ok": True})

    @property
    def bodies(self) -> list[Any]:
        return [orjson.loads(r.content) for r in self.requests]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event of every batch request, in the order they were sent."""
        return [
            e
            for r in self.requests
            if r.url.path.endswith("/batch")
            for e in orjson.loads(r.content)["events"]
        ]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


@attrs.define
class Clock:
    """A wall clock that only moves when told to."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


@attrs.define
class Sleeps:
    """A sleep that records what it was asked to wait and returns at once."""

    delays: list[float] = attrs.field(factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def settings(api: Api, clock: Clock, sleeps: Sleeps) -> dict[str, Any]:
    """Keyword arguments for an AsyncClient wired to the fake API, clock and sleep."""
    return {
        "api_key": API_KEY,
        "transport": api.transport(),
        "clock": clock,
        "sleep": sleeps,
        "flush_interval": 60.0,
    }


@pytest.fixture
def reports() -> list[Any]:
    """Pass ``reports.append`` as ``on_error`` to collect delivery reports."""
    return []
