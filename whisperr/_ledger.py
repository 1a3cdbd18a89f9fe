"""The ledger: every event's fate is counted, and every event not delivered is reported.

Lifetime: one per client, replaced in a forked child. The counters change only through its
methods; the drops made on callers' paths (any thread) are counted at once and reported in
aggregate, one report per reason, when the runner calls :meth:`Ledger.report_capture_drops`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import operator
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from ._config import OnError
from ._events import Item
from ._exit import app_signals
from ._models import DeliveryReport, ReportType

logger = logging.getLogger("whisperr")

_stamp = operator.itemgetter(2)  # an item's occurred_at, in epoch seconds
DELAY_WINDOW = 4096  # delivered events whose delay stats() summarises: the most recent ones

# True while an on_error hook runs (and in the tasks of async hooks): flush() and aclose()
# called from a hook start their work but do not wait for the runner that is calling the hook.
in_hook: contextvars.ContextVar[bool] = contextvars.ContextVar("whisperr_in_hook", default=False)


@attrs.define(eq=False)
class Ledger:
    """Counters of one client, and the ``on_error`` hook they feed.

    ``spawn`` starts a task in the runner's task group while it runs, for ``async`` hooks,
    from any thread (see ``_runner.HookStarter``). An async hook's awaitable that no task can
    start at once (made on another thread, or while no group is open) waits in
    ``waiting_hooks``, with the context it was made in, and wakes the runner to start it.
    """

    on_error: OnError | None
    delivered: int = 0
    retried: int = 0
    sent: int = 0  # sends that got a receipt (counted apart from tracked events)
    send_failed: int = 0  # sends that raised SendError
    refused: int = 0  # dropped at capture, never queued: invalid (strict=False) or overflow
    identified: int = 0  # identify() calls taken (queued or refused): counted apart from tracks
    spooled: int = 0  # handed to the spool undelivered, for a later client to replay
    replayed: int = 0  # taken from the spool by this client (then delivered, dropped or spooled)
    dropped: Counter[str] = attrs.field(factory=Counter)
    last_error: DeliveryReport | None = None
    spawn: Callable[[Awaitable[Any]], object] | None = None
    waiting_hooks: deque[tuple[contextvars.Context, Awaitable[Any]]] = attrs.field(factory=deque)
    wake: Callable[[], None] | None = None  # the runner's kick: a stay starts what waits
    # Seconds from occurred_at to acknowledgement, of the last DELAY_WINDOW delivered events.
    delays: deque[float] = attrs.field(factory=lambda: deque(maxlen=DELAY_WINDOW))
    on_delivered: Callable[[float], None] | None = None  # metrics: each batch's oldest age
    _at_capture: list[tuple[str, str, str]] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def reset(self) -> None:
        """Zero every counter (in a forked child: the parent's events are the parent's)."""
        self.delivered = self.retried = self.refused = self.sent = self.send_failed = 0
        self.identified = self.spooled = self.replayed = 0
        self.dropped = Counter()
        self.last_error = None
        self.spawn = None
        self._close_waiting_hooks()  # the parent's hooks are the parent's (it runs its copies)
        self.delays = deque(maxlen=DELAY_WINDOW)
        self._at_capture = []
        self._lock = threading.Lock()

    def drop_at_capture(
        self, reason: str, message_id: str, *, queued: bool, detail: str = ""
    ) -> bool:
        """Count an event dropped on the caller's path (any thread); it is reported later.

        Returns whether it is the first drop waiting to be reported (the runner needs a wake).
        """
        with self._lock:
            self.dropped[reason] += 1
            self.refused += not queued
            self._at_capture.append((reason, message_id, detail))
            return len(self._at_capture) == 1

    def count_identify(self) -> None:
        """Count an identify() call that passed the call site (queued, or refused)."""
        with self._lock:
            self.identified += 1

    def spool(self, count: int, *, refused: bool = False) -> None:
        """Count events handed to the spool instead of being dropped (any thread);
        ``refused``: one that was never queued (an overflow with drop_newest)."""
        with self._lock:
            self.spooled += count
            self.refused += refused

    def unspool(self, count: int) -> None:
        """Events counted spooled that the spool could not take (they are dropped next)."""
        with self._lock:
            self.spooled -= count

    def replay(self, count: int) -> None:
        """Count events taken from the spool to be delivered by this client."""
        with self._lock:
            self.replayed += count

    def filtered(self) -> None:
        """Count an event that ``before_send`` dropped: counted, never reported or logged."""
        with self._lock:
            self.dropped["filtered"] += 1
            self.refused += 1

    @property
    def capture_drops_pending(self) -> bool:
        return bool(self._at_capture)

    def report_capture_drops(self) -> None:
        """Report the events dropped on the caller's path so far, one report per reason."""
        with self._lock:
            pending, self._at_capture = self._at_capture, []
        for reason in dict.fromkeys(r for r, _, _ in pending):
            mine = [(mid, detail) for r, mid, detail in pending if r == reason]
            ids = tuple(mid for mid, _ in mine if mid)
            message = f"{events(len(mine))} dropped at capture ({reason})"
            if mine[-1][1]:
                message += f"; the last: {mine[-1][1]}"
            self.report("dropped", reason, message, None, len(mine), ids, counted=True)

    def deliver(self, count: int, items: Sequence[Item] = (), at: float = 0.0) -> None:
        """Count ``count`` events delivered; ``items``, acknowledged at ``at``, time them."""
        self.delivered += count
        if items:
            stamps = list(map(_stamp, items))
            self.delays.extend(map(float(at).__sub__, stamps))  # at - stamp, a C loop
            if self.on_delivered is not None:
                self.on_delivered(at - min(stamps))

    def settle_send(self, landed: bool) -> None:
        """Count a send that ended: with a receipt, or with a SendError for its caller."""
        if landed:
            self.sent += 1
        else:
            self.send_failed += 1

    def retry(self, count: int, report: DeliveryReport) -> None:
        """Count a failed attempt about to be retried; it becomes ``last_error``."""
        self.retried += count
        self.last_error = report

    def drop(
        self, items: Sequence[Item], reason: str, message: str, status: int | None = None
    ) -> None:
        """Count and report events that will never be delivered."""
        ids = tuple(item[4] for item in items if item[4])
        message = f"{events(len(items))} dropped: {message}"
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
        # An event with nobody signed in is expected on public pages: counted and reported,
        # logged at INFO, not a warning per window.
        level = logging.ERROR if kind == "auth" else logging.WARNING
        if reason == "anonymous":
            level = logging.INFO
        logger.log(level, "whisperr: %s (%s): %s", kind, reason, message)
        if self.on_error is None:
            return
        token = in_hook.set(True)
        try:
            with app_signals():
                result = self.on_error(report)
            if inspect.isawaitable(result):
                self._start_hook(result)
        except Exception:
            logger.exception("whisperr: the on_error hook raised; delivery goes on")
        finally:
            in_hook.reset(token)

    def _start_hook(self, result: Awaitable[Any]) -> None:
        """An async hook's awaitable: a task of the runner now, or waiting for the runner."""
        spawn = self.spawn  # read once: the runner's thread may unset it meanwhile
        if spawn is not None:
            try:
                spawn(result)
                return
            except RuntimeError:  # that group has ended: the next stay starts it
                pass
        # In the context made here (in_hook set), as a task would have copied it.
        self.waiting_hooks.append((contextvars.copy_context(), result))
        self.wake_runner()

    def wake_runner(self) -> None:
        """Have a stay of the runner start the hooks waiting (one starts if none serves)."""
        if self.wake is not None:
            self.wake()

    def drop_waiting_hooks(self, why: str) -> None:
        """When no stay of the runner will come: the hooks waiting are closed, and said so."""
        if count := self._close_waiting_hooks():
            logger.warning("whisperr: %d async on_error hook call(s) not run: %s", count, why)

    def _close_waiting_hooks(self) -> int:
        """Close the hooks waiting (none of their code runs); how many there were."""
        count = 0
        while True:
            try:  # another thread may empty it too
                _close(self.waiting_hooks.popleft()[1])
            except IndexError:
                return count
            count += 1


def events(count: int) -> str:
    """``"1 event"``, ``"2 events"``: a count of events for a message."""
    return f"{count} event" if count == 1 else f"{count} events"


def _close(result: Awaitable[Any]) -> None:
    """Close a hook's awaitable that never ran (a coroutine's close runs none of its code)."""
    getattr(result, "close", lambda: None)()


async def await_hook(result: Awaitable[Any]) -> None:
    """Run an async hook's awaitable; one that raises never disturbs delivery."""
    try:
        await result
    except Exception:
        logger.exception("whisperr: the on_error hook raised; delivery goes on")
