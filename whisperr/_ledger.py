"""The ledger: every event's fate is counted, and every event not delivered is reported."""

from __future__ import annotations

import inspect
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from ._config import OnError
from ._events import Item
from ._models import DeliveryReport, ReportType

logger = logging.getLogger("whisperr")


@attrs.define(eq=False)
class Ledger:
    """Counters of one client, and the ``on_error`` hook they feed.

    ``spawn`` is the runner's ``TaskGroup.start_soon`` while it runs, for ``async`` hooks.
    """

    on_error: OnError | None
    delivered: int = 0
    retried: int = 0
    refused: int = 0  # dropped at capture, never queued: invalid (strict=False) or drop_newest
    dropped: Counter[str] = attrs.field(factory=Counter)
    last_error: DeliveryReport | None = None
    spawn: Callable[..., object] | None = None
    _at_capture: list[tuple[str, str]] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def drop_at_capture(self, reason: str, message_id: str, *, queued: bool) -> None:
        """Count an event dropped on the caller's path (any thread); it is reported later."""
        with self._lock:
            self.dropped[reason] += 1
            self.refused += not queued
            self._at_capture.append((reason, message_id))

    def report_capture_drops(self) -> None:
        """Report the events dropped on the caller's path so far, one report per reason."""
        with self._lock:
            pending, self._at_capture = self._at_capture, []
        for reason in dict.fromkeys(r for r, _ in pending):
            ids = tuple(mid for r, mid in pending if r == reason and mid)
            count = sum(1 for r, _ in pending if r == reason)
            message = f"{count} events dropped at capture ({reason})"
            self.report("dropped", reason, message, None, count, ids, counted=True)

    def drop(
        self, items: Sequence[Item], reason: str, message: str, status: int | None = None
    ) -> None:
        """Count and report events that will never be delivered."""
        ids = tuple(item[4] for item in items if item[4])
        message = f"{len(items)} events dropped: {message}"
        self.report("dropped", reason, message, status, len(items), ids)

    def report(
        self,
        kind: ReportType,
        reason: str,
        message: str,
        status: int | None,
        count: int,
        message_ids: tuple[str, ...],
        *,
        counted: bool = False,
    ) -> None:
        """Log a report and hand it to the hook; a hook that raises never disturbs delivery."""
        report = DeliveryReport(kind, reason, message, status, count, message_ids)
        self.last_error = report
        if kind == "dropped" and not counted:
            with self._lock:
                self.dropped[reason] += count
        (logger.error if kind == "auth" else logger.warning)(
            "whisperr: %s (%s): %s", kind, reason, message
        )
        if self.on_error is None:
            return
        try:
            result = self.on_error(report)
        except Exception:
            logger.exception("whisperr: the on_error hook raised; delivery goes on")
            return
        if inspect.isawaitable(result):
            if self.spawn is not None:
                self.spawn(_await_hook, result)
            else:
                logger.warning("whisperr: an async on_error hook was called outside the runner")
                getattr(result, "close", lambda: None)()


async def _await_hook(result: Awaitable[Any]) -> None:
    try:
        await result
    except Exception:
        logger.exception("whisperr: the on_error hook raised; delivery goes on")
