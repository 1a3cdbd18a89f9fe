"""Test kit: assert what your code tracked, through the real client, with no network or key.

    from whisperr.testing import Capture

    def test_checkout_tracks_the_failure(whisperr_capture: Capture) -> None:
        checkout(card="declined")                    # your code calls whisperr.track(...)
        whisperr_capture.assert_tracked("payment_failed", user="user_8842")

Events go through the real capture, validation, batching and JSON encoding of
:class:`whisperr.AsyncClient`, and are received in memory by the bundled local server
(``whisperr.server``), which checks them against the wire contract as the real API would.

With pytest, the plugin this package registers gives the ``whisperr_capture`` fixture: a fresh
:class:`Capture` whose client is installed as the module-level client for the test
(:meth:`Capture.installed`), so code written against ``whisperr.track(...)`` is captured, also
when it calls ``whisperr.init()`` and ``whisperr.shutdown()`` itself. Reading what a capture
received (:attr:`Capture.events`, :meth:`Capture.assert_tracked`, ...) first waits until its
clients delivered what they hold, so a test asserts right after the code under test returns.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, final

import attrs
import httpx

from . import _default
from ._client import AsyncClient
from ._config import Settings
from ._runner import RunnerState
from ._sync import Client
from .server import WhisperrApp, create_app

__all__ = ["Capture", "FixedClock", "TrackedEvent"]

TEST_API_KEY = "wrk_test_capture"
# The most that reading a capture waits for its clients to deliver (in memory: milliseconds).
DELIVERY_WAIT = 5.0


@final
class FixedClock:
    """A wall clock that stands still until told to move; pass it as ``clock=``.

    Args:
        start: an aware datetime or epoch seconds; defaults to 2026-01-01T00:00:00Z.
    """

    def __init__(self, start: datetime | float = datetime(2026, 1, 1, tzinfo=timezone.utc)) -> None:
        self.now = start.timestamp() if isinstance(start, datetime) else float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


@final
@attrs.frozen
class TrackedEvent:
    """One event as the server received it."""

    user: str
    event_type: str
    properties: Mapping[str, Any]
    context: Mapping[str, Any]
    occurred_at: str

    @property
    def message_id(self) -> str:
        return str(self.context["$message_id"])


@final
class Capture:
    """An in-memory Whisperr API and the clients that talk to it.

    The clients it makes do not read ``WHISPERR_*`` environment variables (a
    ``WHISPERR_DISABLED=1`` set for the test run does not disable them): only ``settings``.

    Reading what it received (:attr:`events`, :attr:`identifies`, :meth:`tracked` and the
    ``assert_*`` methods) first waits, at most ``DELIVERY_WAIT`` (5 s) in all, until each open
    client it made has delivered what was tracked before the read, from any test, plain or
    async; except a client whose delivery runs in the calling thread's event loop (an
    :class:`AsyncClient` of :meth:`client` used in an async test), which cannot be waited for
    there: ``await client.flush()``, or leave its ``async with`` block, before asserting.

    Args:
        clock: the clock of the clients it makes (and of the server's time window);
            a :class:`FixedClock` by default.
        **settings: any other :class:`whisperr.Settings` field for the clients it makes.
    """

    def __init__(self, clock: FixedClock | None = None, **settings: Any) -> None:
        self.clock = FixedClock() if clock is None else clock
        self.app: WhisperrApp = create_app(api_key=TEST_API_KEY, clock=self.clock)
        self.settings: dict[str, Any] = {
            "api_key": TEST_API_KEY,
            "clock": self.clock,
            "transport": httpx.ASGITransport(app=self.app),
            **settings,
        }
        self._clients: weakref.WeakSet[AsyncClient] = weakref.WeakSet()

    def client(self, **overrides: Any) -> AsyncClient:
        """A new AsyncClient whose requests this capture receives."""
        client = AsyncClient(Settings.from_env({}, **(self.settings | overrides)))
        self._clients.add(client)
        return client

    def sync_client(self, **overrides: Any) -> Client:
        """A new sync :class:`whisperr.Client` whose requests this capture receives."""
        client = Client(Settings.from_env({}, **(self.settings | overrides)))
        self._clients.add(client._async)
        return client

    @contextlib.contextmanager
    def installed(self, **overrides: Any) -> Iterator[AsyncClient]:
        """Install a new client of this capture as the module-level client for the block.

        ``whisperr.track()``, ``whisperr.get_client()`` and the integrations that use the
        module-level client reach it, from any thread or event loop (it delivers from its own
        thread). Inside the block ``whisperr.init(...)`` returns it and uses none of the
        settings passed (no key is needed, nothing leaves the process), and
        ``whisperr.shutdown()`` only flushes it: it stays installed and open, so an app's
        lifespan may run (even twice) inside one test. At the end of the block the client is
        closed (what it holds is delivered first) and the module-level client set aside, if
        there was one, is back, untouched. The ``whisperr_capture`` fixture is this block
        around a test.
        """
        client = self.client(**overrides)
        client._runner.own_thread_only = True  # never bound to a test's loop, which may end
        saved = _default._install(client)
        try:
            yield client
        finally:
            _default._restore(saved)
            client._runner.close_blocking(DELIVERY_WAIT)

    def _deliver(self) -> None:
        """Wait until each open client delivered what it holds (see the class docstring)."""
        deadline = time.monotonic() + DELIVERY_WAIT
        for client in list(self._clients):
            runner = client._runner
            if runner.state is RunnerState.CLOSED or client.settings.disabled:
                continue
            runner.flush_blocking(max(deadline - time.monotonic(), 0.0))

    def _pending(self) -> int:
        """How many events and identifies the open clients still hold."""
        pending = 0
        for client in list(self._clients):
            stats = client.stats()
            pending += stats.queued + stats.in_flight
        return pending

    @property
    def events(self) -> list[TrackedEvent]:
        """Every event received, in order, each once (delivered first: see the class)."""
        self._deliver()
        return [
            TrackedEvent(
                e["external_user_id"],
                e["event_type"],
                e["properties"],
                e["context"],
                e["occurred_at"],
            )
            for e in self.app.events
        ]

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """Every identify body received, in order (delivered first: see the class)."""
        self._deliver()
        return self.app.identifies

    def tracked(
        self,
        event_type: str,
        *,
        user: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> list[TrackedEvent]:
        """The events of that type (and user), whose properties include ``properties``."""
        return [e for e in self.events if _matches(e, event_type, user, properties)]

    def assert_tracked(
        self,
        event_type: str,
        *,
        user: str | None = None,
        properties: Mapping[str, Any] | None = None,
        count: int | None = None,
    ) -> TrackedEvent:
        """Assert such an event was received (exactly ``count`` times if given); return the last.

        Properties match as a subset: the event may carry more keys. Events delivered now with
        ``send()`` count too (:meth:`assert_sent` counts only those).

        Raises:
            AssertionError: with a listing of what was received instead.
        """
        return self._assert_among(self.events, "received", event_type, user, properties, count)

    def assert_sent(
        self,
        event_type: str,
        *,
        user: str | None = None,
        properties: Mapping[str, Any] | None = None,
        count: int | None = None,
    ) -> TrackedEvent:
        """:meth:`assert_tracked` for events delivered one at a time (``send()``, on
        ``/v1/events/track``), not in a batch; the others do not count.

        Raises:
            AssertionError: with a listing of what was sent instead.
        """
        received = self.events
        sent = self.app.sent_ids()
        events = [e for e in received if e.message_id in sent]
        return self._assert_among(events, "sent", event_type, user, properties, count)

    def _assert_among(
        self,
        events: list[TrackedEvent],
        heading: str,
        event_type: str,
        user: str | None,
        properties: Mapping[str, Any] | None,
        count: int | None,
    ) -> TrackedEvent:
        """The last of ``events`` matching (``count`` of them if given), or an AssertionError
        listing ``events`` under ``heading``."""
        found = [e for e in events if _matches(e, event_type, user, properties)]
        if found and (count is None or len(found) == count):
            return found[-1]
        wanted = f"{event_type!r} for user {user!r} with properties {dict(properties or {})!r}"
        if heading == "sent":
            wanted += " sent"
        seen = "\n".join(f"  {e.user} {e.event_type} {dict(e.properties)}" for e in events)
        times = "" if count is None else f" {count} time(s), found {len(found)}"
        raise AssertionError(
            f"expected {wanted}{times}; {heading}:\n{seen or '  nothing'}{self._hint()}"
        )

    def _hint(self) -> str:
        """What a failure message adds when a client still holds events."""
        pending = self._pending()
        if not pending:
            return ""
        return (
            f"\n({pending} tracked but not delivered yet: an AsyncClient delivering in this"
            " event loop needs `await client.flush()` before the assert)"
        )

    def assert_nothing_tracked(self) -> None:
        """Assert no event reached the server (delivered first: see the class)."""
        received = self.events
        if received:
            seen = "\n".join(f"  {e.user} {e.event_type} {dict(e.properties)}" for e in received)
            raise AssertionError(f"expected no events, received {len(received)}:\n{seen}")


def _matches(
    event: TrackedEvent, event_type: str, user: str | None, properties: Mapping[str, Any] | None
) -> bool:
    """Of that type (and user), with properties that include ``properties``."""
    return (
        event.event_type == event_type
        and (user is None or event.user == user)
        and all(
            k in event.properties and event.properties[k] == v
            for k, v in (properties or {}).items()
        )
    )
