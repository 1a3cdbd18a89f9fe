"""AsyncClient: capture on the caller's path, then batch and deliver from one background runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, final

import anyio
import attrs
import httpx
import orjson

from . import _events as ev
from ._batches import Batch, take_batch
from ._config import Settings
from ._errors import ClientClosedError, InvalidEventError
from ._http11 import Http1Transport
from ._ledger import Ledger
from ._models import FlushResult, ReportType, Stats
from ._transport import SDK_NAME, Outcome, backoff, post, request_headers
from ._version import __version__

logger = logging.getLogger("whisperr")

# Slack under the byte cap for the envelope and the fields around properties and context.
_EVENT_OVERHEAD = 512
_KNOWN_TYPES_CAP = 4096
_NEVER = sys.maxsize
_CLOSED = "this whisperr client is closed; it takes no more events"
_FINAL_HOOK_BUDGET = 1.0  # seconds an async on_error hook may take over the reports at close


@attrs.define(eq=False)
class _Waiter:
    """A flush() in progress: everything below ``target`` must settle after ``round`` began."""

    target: int
    round: int
    done: anyio.Event = attrs.field(factory=anyio.Event)


@final
class AsyncClient:
    """An asyncio (and trio, through anyio) client for the Whisperr ingestion API.

    ``track()`` and ``identify()`` validate and queue in microseconds and never block; a background
    runner batches the queue and delivers it over one pooled ``httpx.AsyncClient``. Use it as an
    async context manager, or call ``await client.aclose()`` when done.

    Args:
        settings: a :class:`Settings`; keyword arguments override its fields.
        **overrides: any :class:`Settings` field.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = attrs.evolve(settings, **overrides)
        self._settings = s = settings
        self._url_batch = httpx.URL(f"{s.base_url}/v1/events/batch")
        self._url_identify = httpx.URL(f"{s.base_url}/v1/identify")
        self._headers = request_headers(s.api_key or "")
        base = ev.base_context(SDK_NAME, __version__, s.app_version)
        self._base_context = base
        self._base_context_bytes = ev.encode_base_context(base)
        self._max_event_bytes = s.max_batch_bytes - _EVENT_OVERHEAD
        self._known_types: set[str] = set()
        self._millisecond = (0.0, 0.0, 0.0)  # the window of the last stamp, and that stamp
        self._clock = s.clock
        self._strict = s.strict
        self._max_queue = s.max_queue_size
        self._drop_newest = s.overflow == "drop_newest"
        self._accepting = not s.disabled
        self._closed = False

        self._reset_queue()
        self._running = False
        self._closing = False
        self._wakeup: anyio.Event | None = None
        self._runner_done: anyio.Event | None = None
        self._runner_scope: anyio.CancelScope | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Created inside an event loop: remember it, so a track() from another thread (before
        # anything ran on the loop) can start the runner there.
        self._call_soon: Callable[[Callable[[], None]], object] | None = _scheduler_here()
        self._loop_thread: int | None = threading.get_ident()
        self._lock = threading.RLock()  # guards taking from the queue front, from any thread
        self._http: httpx.AsyncClient | None = None
        self._timer_start: float | None = None
        self._paused_until = 0.0
        self._pause_level = 0
        self._failures = 0  # consecutive failed attempts, across batches

    def _reset_queue(self) -> None:
        """Start with an empty queue and zeroed counters (at creation, and in a forked child)."""
        self._queue: deque[ev.Item] = deque()
        self._taken = 0  # how many items have ever left the queue (taken or overflowed)
        self._wake_at = 1  # the queue length at which track() wakes the runner
        self._retained: list[Batch] = []
        self._in_flight: set[Batch] = set()
        self._round = 0
        self._waiters: list[_Waiter] = []
        self._ledger = Ledger(self._settings.on_error)

        self._pid = os.getpid()
        _live_clients.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's queue stays the parent's; start clean."""
        self._lock = threading.RLock()
        self._forget_runner()
        self._reset_queue()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._running else "idle"
        return f"<AsyncClient {self._settings.base_url} {state} queued={len(self._queue)}>"

    @property
    def settings(self) -> Settings:
        """The client's settings."""
        return self._settings

    # -- capture: plain calls on the caller's path ---------------------------------------------

    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
    ) -> str:
        """Queue an event for delivery; never blocks, never raises for delivery problems.

        Args:
            external_user_id: your own stable, non-empty user id.
            event_type: lowercase snake_case, e.g. ``"payment_failed"``.
            properties: a JSON-serializable mapping, encoded now (later changes are not sent).
            context: extra context; your keys win over ``sdk_name``/``sdk_version``/``app_version``.
            occurred_at: an aware ``datetime`` or RFC 3339 string; defaults to now.
            message_id: your own idempotency key (e.g. from an outbox); defaults to a new UUID.

        Returns:
            The event's ``$message_id``.

        Raises:
            InvalidEventError: the event breaks a rule (only with ``strict=True``, the default).
            ClientClosedError: the client was closed.
        """
        try:
            if (
                type(external_user_id) is not str
                or not external_user_id
                or len(external_user_id) > ev.MAX_USER_ID
                or not external_user_id.isascii()
            ):
                ev.check_user_id(external_user_id)
            if event_type not in self._known_types:
                self._learn(event_type)
            if type(properties) is dict:  # the common case, inlined: this is the hot path
                try:
                    props = b"%b" % _dumps(properties)  # an exact-size copy: see encode_object
                except TypeError:
                    ev.encode_object("properties", properties)  # raises, naming the rule
            else:
                props = b"{}" if properties is None else ev.encode_object("properties", properties)
            if context is None and occurred_at is None and message_id is None:
                encoded_context, stamp = None, self._clock()
                try:
                    mid = _next_id()
                except IndexError:
                    mid = ev.new_message_id()
                start, end, shared = self._millisecond
                stamp = shared if start <= stamp < end else self._share(stamp)
            else:
                encoded_context, stamp, mid = self._extras(context, occurred_at, message_id)
            size = len(props) if encoded_context is None else len(props) + len(encoded_context)
            if size > self._max_event_bytes:
                self._too_large(size, encoded_context is not None)
        except InvalidEventError as exc:
            if self._strict:
                raise
            return self._refuse_invalid(exc)
        if encoded_context is None:
            self._enqueue((external_user_id, event_type, stamp, props, mid))
        else:
            self._enqueue((external_user_id, event_type, stamp, props, mid, encoded_context))
        return mid

    def identify(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Queue an identify (traits and contact channels for a user); never blocks.

        It keeps its place in the queue: tracks queued before it are settled before it is sent,
        and tracks queued after it wait for it. ``email``, ``phone`` and ``push_token`` add
        opted-in ``email``, ``sms`` and ``push`` channels after any explicit ``channels``
        (each ``{"channel" or "type", "address", "opted_in"=True, "verified"=None}``).

        Raises:
            InvalidEventError: the call breaks a rule (only with ``strict=True``).
            ClientClosedError: the client was closed.
        """
        shortcuts = (("email", email), ("sms", phone), ("push", push_token))
        try:
            body = ev.encode_identify(
                external_user_id, traits, preferred_channel, channels, shortcuts
            )
        except InvalidEventError as exc:
            if self._strict:
                raise
            self._refuse_invalid(exc)
            return
        self._enqueue((external_user_id, None, self._clock(), body, ""))

    def _enqueue(self, item: ev.Item) -> None:
        """Append a captured message, within the queue's bound, and wake the runner if due."""
        if not self._accepting:
            if self._closed:
                raise ClientClosedError(_CLOSED)
            return  # disabled: validated, then discarded by design
        queue = self._queue
        if len(queue) >= self._max_queue:
            if self._drop_newest:
                self._refuse("queue_overflow", item[4])
                return
            self._drop_oldest()
        queue.append(item)
        if not self._accepting:
            self._retract(item)  # closed by another thread between the check and the append
        if len(queue) >= self._wake_at:
            self._kick()

    def _share(self, stamp: float) -> float:
        # Events of one millisecond are sent with the same occurred_at: let them share one float
        # (32 bytes an event fewer in a queue filled by a burst, and a cache hit when encoding).
        self._millisecond = (*ev.millisecond_window(stamp), stamp)
        return stamp

    def _learn(self, event_type: object) -> None:
        ev.check_event_type(event_type)
        if len(self._known_types) < _KNOWN_TYPES_CAP:
            self._known_types.add(event_type)  # type: ignore[arg-type]

    def _extras(
        self, context: object, occurred_at: object, message_id: object
    ) -> tuple[bytes | None, float, str]:
        encoded, context_id = None, None
        if context is not None:
            encoded, context_id = ev.encode_context(context, self._base_context)
        now = self._clock()
        stamp = now if occurred_at is None else ev.parse_occurred_at(occurred_at, now)
        if message_id is not None:
            return encoded, stamp, ev.check_message_id(message_id)
        return encoded, stamp, context_id or ev.new_message_id()

    def _too_large(self, size: int, with_context: bool) -> None:
        field = "properties and context" if with_context else "properties"
        raise InvalidEventError(
            field,
            f"encode to {size} bytes; at most {self._max_event_bytes} fit in a request of "
            f"max_batch_bytes={self._settings.max_batch_bytes}",
        )

    def _retract(self, item: ev.Item) -> None:
        with self._lock:
            try:
                self._queue.remove(item)
            except ValueError:
                return  # closing took it already: it is delivered or reported like the rest
        raise ClientClosedError(_CLOSED)

    def _refuse_invalid(self, exc: InvalidEventError) -> str:
        logger.warning("whisperr: invalid event dropped: %s", exc)
        message_id = ev.new_message_id()
        self._refuse("invalid", message_id)
        return message_id

    def _refuse(self, reason: str, message_id: str) -> None:
        self._ledger.drop_at_capture(reason, message_id, queued=False)
        self._kick()

    def _drop_oldest(self) -> None:
        with self._lock:
            if not self._queue:
                return
            item = self._queue.popleft()
            self._taken += 1
            self._ledger.drop_at_capture("queue_overflow", item[4], queued=True)

    # -- the runner ----------------------------------------------------------------------------

    def _kick(self) -> None:
        """Wake the runner (starting it inside a running event loop if needed), from any thread."""
        if self._call_soon is not None and threading.get_ident() != self._loop_thread:
            self._kick_from_thread()  # e.g. FastAPI's sync routes: wake (or start) it in its loop
            return
        if not self._running and not self._start():
            return
        self._wake_at = _NEVER
        self._notify()

    def _kick_from_thread(self) -> None:
        call_soon = self._call_soon
        if call_soon is None:
            return
        # RuntimeError: that loop is closed; the next loop to use the client restarts the runner.
        with contextlib.suppress(RuntimeError):
            call_soon(self._kick)

    def _start(self) -> bool:
        """Start the runner as a task of the current event loop; False outside of one."""
        if self._pid != os.getpid():
            self._after_fork()  # forked by a path that skipped os.register_at_fork hooks
        call_soon = _scheduler_here()
        if self._settings.disabled or call_soon is None:
            return False
        self._begin(call_soon)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # trio, as _scheduler_here() found
            sys.modules["trio"].lowlevel.spawn_system_task(self._run, name="whisperr-runner")
        else:
            self._task = self._loop.create_task(self._run(), name="whisperr-runner")
        return True

    def _begin(self, call_soon: Callable[[Callable[[], None]], object]) -> None:
        # Called inside the event loop the runner will live in; a previous loop's events are stale.
        self._running = True
        self._wakeup = None
        self._runner_done = anyio.Event()
        self._loop_thread = threading.get_ident()
        self._call_soon = call_soon

    def _ensure_running(self) -> None:
        self._forget_dead_runner()
        if not self._running and not self._start():
            raise RuntimeError("whisperr: flush() and aclose() must run inside an event loop")

    def _forget_dead_runner(self) -> None:
        if self._running and self._loop is not None and self._loop.is_closed():
            self._forget_runner()  # its loop was closed under it without cancelling it

    def _forget_runner(self) -> None:
        """Drop the runner state of a dead event loop or of the parent process; keep the queue."""
        self._running = False
        self._closing = self._closed
        self._loop = self._call_soon = self._ledger.spawn = self._wakeup = self._http = None
        self._runner_done = None
        for batch in list(self._in_flight):  # cut off mid-request: kept, sent again
            self._retain(batch)
        self._in_flight.clear()
        self._wake_at = 1

    async def _run(self) -> None:
        done = self._runner_done
        assert done is not None
        s = self._settings
        self._http = s.http_client or httpx.AsyncClient(
            transport=s.transport or Http1Transport(max_idle=s.max_concurrency), trust_env=False
        )
        try:
            with anyio.CancelScope() as self._runner_scope:
                await self._serve()
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    try:
                        if not self._closing:  # the event loop is ending without aclose()
                            await self._last_attempt()
                    finally:
                        await self._finish()
            finally:
                done.set()

    async def _last_attempt(self) -> None:
        logger.info("whisperr: event loop ending without aclose(); delivering what is queued")
        self._closing = True
        self._round += 1
        with anyio.move_on_after(self._settings.shutdown_timeout):
            await self._serve()

    async def _finish(self) -> None:
        await self._final_reports()
        if self._http is not None and self._settings.http_client is None:
            await self._http.aclose()
        self._http = None
        self._running = False
        self._closing = False
        self._wake_at = 1
        self._release_waiters(force=True)

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            self._ledger.spawn = tg.start_soon
            try:
                while (batch := await self._next_batch()) is not None:
                    self._in_flight.add(batch)
                    if batch.identify:
                        await self._deliver(batch)
                    else:
                        tg.start_soon(self._deliver, batch)
            finally:
                self._ledger.spawn = None

    async def _next_batch(self) -> Batch | None:
        """Wait until a batch should go out and return it; None once closing has drained."""
        while True:
            self._ledger.report_capture_drops()
            self._release_waiters()
            batch = self._ready_batch()
            if batch is not None:
                return batch
            queue_done = not self._queue or self._held_by_identify(self._round)
            if self._closing and queue_done and not self._in_flight and not self._sendable():
                return None
            await self._wait(self._next_deadline())

    def _urgent(self) -> bool:
        return self._closing or bool(self._waiters)

    def _sendable(self) -> list[Batch]:
        now = anyio.current_time()
        return [
            b for b in self._retained if b.retained_round < self._round or now >= self._paused_until
        ]

    def _ready_batch(self) -> Batch | None:
        # Once attempts keep failing (not one isolated failure), one batch probes the server and
        # the rest wait in the queue: the client backs off as a whole.
        limit = 1 if self._failures >= 2 else self._settings.max_concurrency
        if self._in_flight and (
            len(self._in_flight) >= limit or any(b.identify for b in self._in_flight)
        ):
            return None
        sendable = self._sendable()
        if sendable:
            batch = sendable[0]
            if batch.identify and self._in_flight:
                return None  # identify is a barrier: everything before it settles first
            self._retained.remove(batch)
            return batch
        if not self._queue:
            return None
        urgent = self._urgent()
        # Kept batches go first, after their pause; a flush or close still gives the queue its
        # attempt, unless a kept identify must stay ahead of the tracks queued after it.
        if self._retained and (not urgent or any(b.identify for b in self._retained)):
            return None
        if self._queue[0][1] is None and self._in_flight:
            return None
        if urgent or len(self._queue) >= self._settings.max_batch_size or self._due():
            return self._take()
        return None

    def _due(self) -> bool:
        now = anyio.current_time()
        if self._timer_start is None:
            self._timer_start = now
        return now >= self._timer_start + self._settings.flush_interval

    def _next_deadline(self) -> float | None:
        """How long the runner may sleep before it has something to do on its own."""
        now = anyio.current_time()
        deadlines = []
        if self._retained:
            deadlines.append(self._paused_until - now)
        if self._queue and self._timer_start is not None:
            deadlines.append(self._timer_start + self._settings.flush_interval - now)
        self._wake_at = 1 if not self._queue else self._settings.max_batch_size
        # A deadline already passed, yet no batch was ready: something in flight holds the next
        # one back, and its end wakes the runner. Sleeping 0 would spin.
        ahead = [d for d in deadlines if d > 0]
        return min(ahead) if ahead else None

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._wakeup.wait()

    def _notify(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _take(self) -> Batch | None:
        """Take the next batch off the queue (under the lock other threads drop oldest with)."""
        s = self._settings
        with self._lock:
            batch, taken = take_batch(
                self._queue,
                self._taken,
                max_size=s.max_batch_size,
                max_bytes=s.max_batch_bytes,
                base_context=self._base_context_bytes,
                now=s.clock(),
                ledger=self._ledger,
            )
            self._taken += taken
        if not self._queue:
            self._timer_start = None
        return batch

    # -- delivery --------------------------------------------------------------------------

    async def _deliver(self, batch: Batch) -> None:
        outcome: Outcome | None = None
        try:
            outcome = await self._attempts(batch)
        except Exception:
            logger.exception("whisperr: unexpected error while delivering; the batch is kept")
            self._failures += 1
            self._pause()
        finally:
            self._in_flight.discard(batch)
            if outcome is None:  # cancelled mid-request: keep it, it may be retried
                self._retain(batch)
            else:
                self._settle(batch, outcome)
            self._notify()

    async def _attempts(self, batch: Batch) -> Outcome:
        s = self._settings
        assert self._http is not None
        url = self._url_identify if batch.identify else self._url_batch
        body = batch.bodies[0] if batch.identify else ev.batch_body(batch.bodies)
        attempt = 0
        while True:
            outcome = await post(self._http, url, self._headers, body, s.request_timeout, s.clock)
            self._failures = self._failures + 1 if outcome.kind in ("retry", "auth") else 0
            if outcome.kind != "retry" or attempt >= s.max_retries:
                return outcome
            batch.failure = outcome.reason
            delay = outcome.retry_after
            if delay is None:
                delay = backoff(attempt, s.backoff_base, s.backoff_cap)
            logger.debug("whisperr: %s; retrying in %.2fs", outcome.message, delay)
            self._ledger.retried += len(batch.items)
            attempt += 1
            await s.sleep(delay)

    def _settle(self, batch: Batch, outcome: Outcome) -> None:
        count = len(batch.items)
        if outcome.kind == "ok":
            rejected = min(outcome.rejected, count)
            self._ledger.delivered += count - rejected
            self._pause_level = 0
            if rejected:
                self._ledger.report(
                    "dropped",
                    "partially_rejected",
                    f"the server rejected {rejected} of {count} events in a batch",
                    outcome.status,
                    rejected,
                    (),
                )
        elif outcome.kind == "too_large" and count > 1:
            self._retained[:0] = batch.halves()  # sent again at once, in order
        elif outcome.kind in ("drop", "too_large"):
            self._ledger.drop(batch.items, outcome.reason, outcome.message, outcome.status)
        else:
            kind: ReportType = "auth" if outcome.kind == "auth" else "retry_exhausted"
            batch.failure = outcome.reason
            self._retain(batch)
            self._pause()
            self._ledger.report(
                kind,
                outcome.reason,
                f"{outcome.message}; {count} events kept for a later attempt",
                outcome.status,
                count,
                batch.message_ids,
            )

    def _retain(self, batch: Batch) -> None:
        batch.retained_round = self._round
        self._retained.append(batch)
        self._retained.sort(key=lambda b: b.first)

    def _pause(self) -> None:
        s = self._settings
        self._pause_level += 1
        ceiling = max(s.backoff_cap, 1.0)
        delay = min(ceiling, max(s.backoff_base, 0.1) * 2.0 ** min(self._pause_level, 30))
        self._paused_until = anyio.current_time() + delay * random.uniform(0.5, 1.0)

    # -- accounting ---------------------------------------------------------------------------

    async def _final_reports(self) -> None:
        """Report what is left (everything, once closed); an async hook gets a second for them."""
        with anyio.move_on_after(_FINAL_HOOK_BUDGET):
            async with anyio.create_task_group() as tg:
                self._ledger.spawn = tg.start_soon
                if self._closed:
                    self._account_undelivered()
                self._ledger.report_capture_drops()
        self._ledger.spawn = None

    def _account_undelivered(self) -> None:
        """At close: report everything not delivered, so that tracked == delivered + dropped."""
        leftovers: dict[str, list[ev.Item]] = {}
        for batch in self._retained:
            leftovers.setdefault(batch.failure, []).extend(batch.items)
        self._retained.clear()
        with self._lock:  # against track() racing close from another thread
            queued = list(self._queue)
            self._taken += len(queued)
            self._queue.clear()
        if queued:
            leftovers.setdefault("shutdown", []).extend(queued)
        for reason, items in leftovers.items():
            self._ledger.drop(items, reason, "not delivered before the client closed")

    def _release_waiters(self, force: bool = False) -> None:
        for waiter in list(self._waiters):
            if force or self._settled(waiter):
                self._waiters.remove(waiter)
                waiter.done.set()

    def _held_by_identify(self, round: int) -> bool:
        """Whether a kept identify, tried again since ``round`` began, holds the queue back."""
        return any(b.identify and b.retained_round >= round for b in self._retained)

    def _settled(self, waiter: _Waiter) -> bool:
        if self._taken < waiter.target and not self._held_by_identify(waiter.round):
            return False
        if any(b.first < waiter.target for b in self._in_flight):
            return False
        return not any(
            b.first < waiter.target and b.retained_round < waiter.round for b in self._retained
        )

    # -- waiting: flush and close -------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until everything tracked before this call is settled, or ``timeout`` passes.

        Settled means delivered, dropped, or kept after an auth failure or exhausted retries
        (each kept batch gets one more attempt per flush).

        Returns:
            What was delivered and dropped meanwhile, and what is still pending.
        """
        before = (self._ledger.delivered, self.stats().dropped)
        if self._closed or self._settings.disabled:
            return self._result(before, timed_out=False)
        self._ensure_running()
        self._round += 1
        waiter = _Waiter(self._taken + len(self._queue), self._round)
        self._waiters.append(waiter)
        self._notify()
        try:
            with anyio.move_on_after(timeout) as scope:
                await waiter.done.wait()
        finally:  # also when the caller is cancelled
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return self._result(before, timed_out=scope.cancelled_caught)

    async def aclose(self, timeout: float | None = None) -> FlushResult:
        """Stop intake, deliver what is queued within ``timeout`` and account for the rest.

        ``timeout`` defaults to the ``shutdown_timeout`` setting. Everything not delivered by
        then is counted as dropped and reported (reason ``shutdown``, or why it was kept).
        Closes the connection pool unless it was passed in as ``http_client``.
        """
        before = (self._ledger.delivered, self.stats().dropped)
        if not self._closed:
            self._accepting = False
            self._closed = self._closing = True
            self._round += 1
        self._forget_dead_runner()
        if self._queue or self._retained:
            self._ensure_running()
        done = self._runner_done
        timed_out = False
        if self._running and done is not None:  # also when an earlier aclose() was cancelled
            self._notify()
            with anyio.move_on_after(
                self._settings.shutdown_timeout if timeout is None else timeout
            ):
                await done.wait()
            if not done.is_set():
                timed_out = True
                assert self._runner_scope is not None
                self._runner_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await done.wait()
        else:
            await self._final_reports()
        return self._result(before, timed_out=timed_out)

    async def __aenter__(self) -> AsyncClient:
        if self._closed:
            raise ClientClosedError("this whisperr client is closed")
        if not self._settings.disabled:
            self._ensure_running()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> Stats:
        """A frozen snapshot of the counters (computing ``queued_bytes`` walks the queue)."""
        retained = [item for batch in self._retained for item in batch.items]
        queued = list(self._queue)
        base = len(self._base_context_bytes)
        queued_bytes = sum(
            len(i[3]) + (len(i[5]) if len(i) > 5 else base) + 128 for i in queued
        ) + sum(len(body) for batch in self._retained for body in batch.bodies)
        ledger = self._ledger
        dropped = dict(ledger.dropped)
        in_flight = list(self._in_flight)
        return Stats(
            tracked=self._taken + len(self._queue) + ledger.refused,
            delivered=ledger.delivered,
            dropped=sum(dropped.values()),
            dropped_by_reason=dropped,
            retried=ledger.retried,
            queued=len(queued) + len(retained),
            queued_bytes=queued_bytes,
            in_flight=sum(len(b.items) for b in in_flight),
            batches_in_flight=len(in_flight),
            last_error=ledger.last_error,
        )

    def _result(self, before: tuple[int, int], *, timed_out: bool) -> FlushResult:
        stats = self.stats()
        return FlushResult(
            delivered=stats.delivered - before[0],
            dropped=stats.dropped - before[1],
            pending=stats.queued + stats.in_flight,
            timed_out=timed_out,
        )


def _scheduler_here() -> Callable[[Callable[[], None]], object] | None:
    """The thread-safe call_soon of the event loop running in this thread; None outside one."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None
    return token.run_sync_soon  # type: ignore[no-any-return]


_dumps = orjson.dumps  # the one orjson call outside _events: inlined in track(), the hot path
_next_id = ev.ready_ids.pop
_live_clients: weakref.WeakSet[AsyncClient] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_live_clients):
        client._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
