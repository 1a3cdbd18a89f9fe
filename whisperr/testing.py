"""Test kit: assert what your code tracked, through the real client, with no network or key.

    from whisperr.testing import Capture

    async def test_checkout_tracks_the_failure() -> None:
        capture = Capture()
        async with capture.client() as client:
            await checkout(client, card="declined")     # your code calls client.track(...)
            await client.flush()                       # delivery happens now, no sleeping
        capture.assert_tracked("payment_failed", user="user_8842", properties={"amount_cents": 1})

Events go through the real capture, validation, batching and JSON encoding of
:class:`whisperr.AsyncClient`, and are received in memory by the bundled local server
(``whisperr.server``), which checks them against the wire contract as the real API would.

With pytest, the plugin this package registers gives the ``whisperr_capture`` fixture: a fresh
:class:`Capture` that is also installed as the module-level default client, so code written
against ``whisperr.track(...)`` is captured as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, final

import attrs
import httpx

from ._client import AsyncClient
from ._sync import Client
from .server import WhisperrApp, create_app

__all__ = ["Capture", "FixedClock", "TrackedEvent"]

TEST_API_KEY = "wrk_test_capture"


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

    def client(self, **overrides: Any) -> AsyncClient:
        """A new AsyncClient whose requests this capture receives."""
        return AsyncClient(**(self.settings | overrides))

    def sync_client(self, **overrides: Any) -> Client:
        """A new sync :class:`whisperr.Client` whose requests this capture receives."""
        return Client(**(self.settings | overrides))

    @property
    def events(self) -> list[TrackedEvent]:
        """Every event received, in order, each once."""
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
        """Every identify body received, in order."""
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
        sent = self.app.sent_ids()
        events = [e for e in self.events if e.message_id in sent]
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
        raise AssertionError(f"expected {wanted}{times}; {heading}:\n{seen or '  nothing'}")

    def assert_nothing_tracked(self) -> None:
        """Assert no event reached the server."""
        if self.app.events:
            raise AssertionError(f"expected no events, received {len(self.app.events)}")


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
