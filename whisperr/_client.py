"""AsyncClient: the public API and the ``track()`` hot path; the parts below it do the rest.

The client captures on the caller's path and hands the message to its :class:`Intake`; the
:class:`Runner` serves the queue from a host (the caller's event loop, or the client's own
thread), asking the :class:`Scheduler` which batch goes next and :class:`Delivery` to send it;
the :class:`Ledger` counts every fate. See the package's README for the layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import attrs
import orjson

from . import _events as ev
from . import _exit
from ._config import Settings, SettingsArgs
from ._delivery import Delivery
from ._errors import ClientClosedError, InvalidEventError
from ._hooks import Hooks
from ._intake import ITEM_OVERHEAD, Intake
from ._ledger import Ledger
from ._metrics import Metrics
from ._models import FlushResult, Receipt, Stats
from ._runner import Runner, RunnerState
from ._schedule import Scheduler
from ._send import REPORT_GRACE, SendJob, not_sent
from ._transport import SDK_NAME
from ._version import __version__

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no dependency: the annotations are never evaluated
    from typing_extensions import Unpack
if TYPE_CHECKING:
    from ._spooler import Spooler

# Slack under the byte cap for the envelope and the fields around properties and context: the
# keys, the stamp, an event type (at most 255 characters) and a generated message id.
_EVENT_OVERHEAD = 512
_ENVELOPE = len(ev.batch_body([]))
# An upper bound of how much a string grows when escaped in JSON (a control character: \u0000).
_ESCAPED = 6
_KNOWN_TYPES_CAP = 4096


@final
class AsyncClient:
    """An asyncio (and trio, through anyio) client for the Whisperr ingestion API.

    ``track()`` and ``identify()`` validate and queue in microseconds and never block; a background
    runner batches the queue and delivers it over pooled keep-alive connections (or the httpx
    ``transport``/``http_client`` given). Use it as an async context manager, or call
    ``await client.aclose()`` when done.

    Args:
        settings: a :class:`Settings` (or the API key, as a string); keyword arguments override
            its fields. Fields given in neither are read from ``WHISPERR_*`` environment
            variables, else take their defaults.
        **overrides: any :class:`Settings` field, typed as the field (a type checker flags a
            misspelt keyword or a wrong type).

    Raises:
        ConfigError: a setting is invalid or of the wrong type; the message names it.
    """

    def __init__(
        self, settings: Settings | str | None = None, **overrides: Unpack[SettingsArgs]
    ) -> None:
        if isinstance(settings, str):  # the API key, as the official SDK takes it
            settings, overrides = None, {"api_key": settings, **overrides}
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = attrs.evolve(settings, **overrides)
        self._settings = s = settings
        base = ev.base_context(SDK_NAME, __version__, s.app_version)
        self._base_context = base
        self._base_tail = ev.context_tail(ev.encode_base_context(base))
        # Within this, an event fits whatever its user id escapes to in JSON.
        self._max_event_bytes = s.max_batch_bytes - _EVENT_OVERHEAD - _ESCAPED * ev.MAX_USER_ID
        self._known_types: set[str] = set()
        self._millisecond = (0.0, 0.0, 0.0)  # the window of the last stamp, and that stamp
        self._clock = s.clock
        self._strict = s.strict

        self._ledger = ledger = Ledger(s.on_error)
        # The runner's kick, once it exists; no part refers back to the client, so that the
        # metrics can keep reading the parts of a client after it is collected.
        kick: list[Callable[[], None]] = []
        self._intake = intake = Intake(
            max_size=s.max_queue_size,
            max_bytes=s.max_queue_bytes,
            drop_newest=s.overflow == "drop_newest",
            ledger=ledger,
            wake=lambda: kick[0](),
            disabled=s.disabled,
        )
        self._scheduler = Scheduler(s, intake, ledger, ev.encode_base_context(base))
        delivery = Delivery(s, ledger)
        self._runner = Runner(s, intake, self._scheduler, delivery, ledger)
        kick.append(self._runner.kick)
        ledger.wake = self._runner.kick
        self._put = intake.put
        self._spooler: Spooler | None = None
        if s.spool_path is not None and not s.disabled:
            self._open_spool(s, intake, ledger)
        self._pid = os.getpid()
        self._hooks: Hooks | None = None
        if s.before_send is not None or s.pii is not None:
            self._hooks = Hooks(s.before_send, s.pii, ledger, s.clock)
            self.track = self._track_through_hooks  # type: ignore[method-assign]
        if s.metrics_on:
            metrics = Metrics.of(s.meter_provider)
            metrics.watch(
                self,
                functools.partial(
                    _snapshot, ledger, intake, self._scheduler, self._runner, delays=False
                ),
            )
            delivery.on_request = metrics.request
            ledger.on_delivered = metrics.delivered
        _exit.register(self)

    def _open_spool(self, s: Settings, intake: Intake, ledger: Ledger) -> None:
        """With ``spool_path``: overflow and what is left at close go to the file, and what
        the file holds is replayed from now on (``spool_mode="always"``: every event goes to
        it, from the spool's worker thread)."""
        from ._spooler import Spooler  # sqlite3 only for those who spool

        spooler = Spooler.open(s, ledger)
        if spooler is None:
            return  # logged: the client runs on memory only
        self._spooler = self._scheduler.spooler = spooler
        spooler.wake_runner = self._runner.kick
        intake.spill = spooler.spill_overflow
        if spooler.always:
            put, journal = intake.put, spooler.journal

            def put_journaled(item: ev.Item, size: int) -> None:
                # Journaled first: a runner on another thread may deliver it (and have it
                # deleted from the file) as soon as it is queued.
                journal.append(item)
                try:
                    put(item, size)
                except ClientClosedError:
                    with contextlib.suppress(ValueError):  # else written: the next client sends it
                        journal.remove(item)  # rare: closed meanwhile
                    raise

            self._put = put_journaled
        spooler.ask_claim()  # what an earlier process left: the worker wakes the runner

    def _after_fork(self) -> None:
        """In a forked child: the parent's queue stays the parent's; start clean."""
        self._ledger.reset()
        self._intake.reset()
        self._scheduler.reset()
        self._runner.after_fork()
        if self._spooler is not None:
            self._spooler.after_fork()
        self._pid = os.getpid()

    def _close_at_exit(self) -> None:
        if self._pid == os.getpid():
            self._runner.close_at_exit()

    def __repr__(self) -> str:
        runner = self._runner
        state = runner.state.value
        if runner.state is RunnerState.RUNNING:
            state += f" in {runner.host_kind}"
        return f"<AsyncClient {self._settings.base_url} {state} queued={len(self._intake)}>"

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
                external_user_id = ev.check_user_id(external_user_id)
            if type(event_type) is not str or event_type not in self._known_types:
                event_type = self._learn(event_type)
            if type(properties) is dict:  # the common case, inlined: this is the hot path
                try:
                    # an exact-size copy: see encode_object
                    props = b"%b" % _dumps(properties, _encode_time, _USER_JSON)
                except Exception:
                    props = ev.encode_object("properties", properties)  # raises, naming the rule
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
                size = len(props)  # a generated message id is within the overhead
                if size > self._max_event_bytes:  # it might not fit: measure it exactly
                    self._check_fits((external_user_id, event_type, stamp, props, mid))
            else:
                encoded_context, stamp, mid = self._extras(context, occurred_at, message_id)
                size = len(props) if encoded_context is None else len(props) + len(encoded_context)
                if size + _ESCAPED * len(mid) > self._max_event_bytes:  # yours may escape large
                    self._check_fits(
                        (external_user_id, event_type, stamp, props, mid)
                        if encoded_context is None
                        else (external_user_id, event_type, stamp, props, mid, encoded_context)
                    )
        except InvalidEventError as exc:
            if self._strict:
                raise
            return self._refuse_invalid(exc)
        if encoded_context is None:
            self._put((external_user_id, event_type, stamp, props, mid), size)
        else:
            self._put((external_user_id, event_type, stamp, props, mid, encoded_context), size)
        return mid

    def _track_through_hooks(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
    ) -> str:
        """:meth:`track` with ``before_send`` or the PII guard set: they run first."""
        assert self._hooks is not None
        try:
            args, mid = self._hooks.event(
                external_user_id, event_type, properties, context, occurred_at, message_id
            )
        except InvalidEventError as exc:  # the PII guard, pii="raise"
            if self._strict:
                raise
            return self._refuse_invalid(exc)
        if args is None:
            return mid  # dropped by before_send: counted as "filtered"
        uid, event_type, properties, context, occurred_at, message_id = args
        return AsyncClient.track(
            self,
            uid,
            event_type,
            properties,
            context,
            occurred_at=occurred_at,
            message_id=message_id,
        )

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
        try:
            body = self._identify_body(
                external_user_id, traits, email, phone, push_token, preferred_channel, channels
            )
        except InvalidEventError as exc:
            if self._strict:
                raise
            self._ledger.count_identify()
            self._refuse_invalid(exc)
            return
        self._intake.put_identify((external_user_id, None, self._clock(), body, ""), len(body))

    def _identify_body(
        self,
        external_user_id: object,
        traits: Mapping[str, Any] | None,
        email: str | None,
        phone: str | None,
        push_token: str | None,
        preferred_channel: str | None,
        channels: Sequence[Mapping[str, Any]] | None,
    ) -> bytes:
        """An identify's request body, validated (traits through the PII guard, if set)."""
        if self._hooks is not None and isinstance(traits, Mapping):
            traits = self._hooks.guard("traits", traits)
        shortcuts = (("email", email), ("sms", phone), ("push", push_token))
        return ev.encode_identify(external_user_id, traits, preferred_channel, channels, shortcuts)

    def _share(self, stamp: float) -> float:
        # Events of one millisecond are sent with the same occurred_at: let them share one float
        # (32 bytes an event fewer in a queue filled by a burst, and a cache hit when encoding).
        self._millisecond = (*ev.millisecond_window(stamp), stamp)
        return stamp

    def _learn(self, event_type: object) -> str:
        """Validate an event type not seen before; the exact ``str`` to queue (not a subclass)."""
        exact = ev.check_event_type(event_type)
        if len(self._known_types) < _KNOWN_TYPES_CAP:
            self._known_types.add(exact)
        return exact

    def _extras(
        self, context: object, occurred_at: object, message_id: object
    ) -> tuple[bytes | None, float, str]:
        encoded, context_id = None, None
        if context is not None:
            encoded, context_id = ev.encode_context(context, self._base_context)
        now = self._clock()
        if occurred_at is None:
            stamp = now
        elif type(occurred_at) is ev.CaptureStamp:  # the hooks' capture time, unchanged
            stamp = float(occurred_at)
        else:
            stamp = ev.parse_occurred_at(occurred_at, now)
        if message_id is not None:
            return encoded, stamp, ev.check_message_id(message_id)
        return encoded, stamp, context_id or ev.new_message_id()

    def _check_fits(self, item: ev.Item) -> None:
        """Raise unless the event, encoded, fits in a request of ``max_batch_bytes``."""
        encoded = len(ev.encode_event(item, self._base_tail))
        room = self._settings.max_batch_bytes - _ENVELOPE
        if encoded <= room:
            return
        parts = {
            "properties": len(item[3]),
            "context": len(item[5]) if len(item) > 5 else 0,
            "external_user_id": len(orjson.dumps(item[0])),
            "message_id": len(orjson.dumps(item[4])),
        }
        raise InvalidEventError(
            max(parts, key=parts.__getitem__),
            f"the event encodes to {encoded} bytes; at most {room} fit in a request of "
            f"max_batch_bytes={self._settings.max_batch_bytes}",
        )

    def _drop_anonymous(self, event_type: object) -> None:
        """An event for the current request's user, with nobody signed in: counted, reported."""
        detail = f"{event_type!r:.80} with nobody signed in"
        if self._ledger.drop_at_capture("anonymous", "", queued=False, detail=detail):
            self._runner.kick()

    def _refuse_invalid(self, exc: InvalidEventError) -> str:
        message_id = ev.new_message_id()
        if self._ledger.drop_at_capture("invalid", message_id, queued=False, detail=str(exc)):
            self._runner.kick()  # the first drop of a reporting window: the runner reports it
        return message_id

    # -- delivering now: send and identify_now ------------------------------------------------

    async def send(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Deliver one event now, alone (``POST /v1/events/track``), and return the receipt.

        Validated and stamped as :meth:`track` does, but not queued: it does not wait for the
        queue, and ``flush()`` does not wait for it. 429, 5xx, network failures and timeouts
        are retried with the client's backoff and Retry-After rules, with the same body (the
        same ``$message_id`` and ``occurred_at``) every time, as long as another attempt fits
        in ``timeout`` (default: ``request_timeout``). Works from any event loop or thread.

        Args:
            external_user_id, event_type, properties, context, occurred_at, message_id: as for
                :meth:`track`; an ``occurred_at`` you pass is sent as given (to the millisecond),
                so a replay keeps its time.
            timeout: the most the call takes, in seconds, retries included.

        Returns:
            A :class:`Receipt` (``sent=False`` when the client is ``disabled``, or when
            ``before_send`` dropped the event).

        Raises:
            InvalidEventError: the event breaks a rule (also with ``strict=False``: the caller
                is waiting for this event).
            SendError: it did not land; ``retryable`` says whether trying again may help.
            ClientClosedError: the client was closed.
        """
        item = self._capture(
            external_user_id, event_type, properties, context, occurred_at, message_id
        )
        if isinstance(item, str):
            return not_sent(item)
        body = ev.encode_event(item, self._base_tail)
        return await self._send(body, item[4], identify=False, timeout=timeout)

    async def identify_now(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Deliver an identify now (``POST /v1/identify``), with the rules of :meth:`send`.

        Not queued: it is not ordered with the tracks in the queue (:meth:`identify` is).

        Raises:
            InvalidEventError, SendError, ClientClosedError: as for :meth:`send`.
        """
        body = self._identify_body(
            external_user_id, traits, email, phone, push_token, preferred_channel, channels
        )
        return await self._send(body, "", identify=True, timeout=timeout)

    def _capture(
        self,
        external_user_id: object,
        event_type: object,
        properties: object,
        context: object,
        occurred_at: object,
        message_id: object,
    ) -> ev.Item | str:
        """One event, validated and stamped as track() makes it (the slow path, whole); or,
        when ``before_send`` dropped it, its message id."""
        if self._hooks is not None:
            args, mid = self._hooks.event(
                external_user_id,
                event_type,
                properties,
                context,
                occurred_at,
                message_id,
                count_drop=False,  # the send's caller gets a Receipt saying so
            )
            if args is None:
                return mid
            external_user_id, event_type, properties, context, occurred_at, message_id = args
        user_id = ev.check_user_id(external_user_id)
        exact_type = ev.check_event_type(event_type)
        props = b"{}" if properties is None else ev.encode_object("properties", properties)
        encoded_context, stamp, mid = self._extras(context, occurred_at, message_id)
        item: ev.Item = (
            (user_id, exact_type, stamp, props, mid)
            if encoded_context is None
            else (user_id, exact_type, stamp, props, mid, encoded_context)
        )
        self._check_fits(item)
        return item

    def _submit(
        self,
        body: bytes,
        message_id: str,
        *,
        identify: bool,
        timeout: float | None,
        blocking: bool = False,
    ) -> SendJob:
        """Hand a send to the runner (a disabled client: a job done at once, not sent).

        While the client closes, a send (from an ``on_error`` hook, say) is still taken. A
        ``blocking`` one on the runner's own thread could never be waited for: it fails at once,
        never sent."""
        if self._runner.state is RunnerState.CLOSED:
            raise ClientClosedError("this whisperr client is closed")
        if timeout is None:
            timeout = self._settings.request_timeout
        elif not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        job = SendJob.make(body, message_id, identify=identify, timeout=timeout)
        if blocking and self._runner.on_host_thread():
            self._ledger.settle_send(False)
            raise job.stopped("a blocking send cannot wait on the client's delivery thread", 0)
        if self._settings.disabled:
            job.receipt = not_sent(message_id)
            job.done.set()
        else:
            self._runner.submit(job)
        return job

    async def _send(
        self, body: bytes, message_id: str, *, identify: bool, timeout: float | None
    ) -> Receipt:
        job = self._submit(body, message_id, identify=identify, timeout=timeout)
        if not await job.done.wait(job.remaining() + REPORT_GRACE):
            job.fail(job.stopped("no answer: the client's delivery did not report in time", 0))
        return job.result()

    # -- waiting: flush and close -------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until everything tracked before this call is settled, or ``timeout`` passes.

        Settled means delivered, dropped, or kept after an auth failure or exhausted retries
        (each kept batch gets one more attempt per flush). It works from any event loop and
        thread; called from inside an ``on_error`` hook it starts the flush without waiting.

        Returns:
            What was delivered and dropped meanwhile, and what is still pending.
        """
        before = self._counts()
        if self._runner.state is RunnerState.CLOSED or self._settings.disabled:
            return self._result(before, timed_out=False)
        settled = await self._runner.flush(timeout)
        return self._result(before, timed_out=not settled and timeout is not None)

    async def aclose(self, timeout: float | None = None) -> FlushResult:
        """Stop intake, deliver what is queued within ``timeout`` and account for the rest.

        ``timeout`` defaults to the ``shutdown_timeout`` setting. Everything not delivered by
        then is counted as dropped and reported (reason ``shutdown``, or why it was kept).
        Closes the connection pool unless it was passed in as ``http_client``. It works from
        any event loop and thread; called from inside an ``on_error`` hook it starts the close
        without waiting for it.
        """
        before = self._counts()
        if timeout is None:
            timeout = self._settings.shutdown_timeout
        finished = await self._runner.aclose(timeout)
        return self._result(before, timed_out=not finished)

    async def __aenter__(self) -> AsyncClient:
        if self._runner.state is RunnerState.CLOSED:
            raise ClientClosedError("this whisperr client is closed")
        self._runner.start()
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
        """A frozen snapshot of the counters; from any thread."""
        return _snapshot(self._ledger, self._intake, self._scheduler, self._runner, delays=True)

    def _counts(self) -> tuple[int, int]:
        return self._ledger.delivered, sum(self._ledger.dropped.values())

    def _result(self, before: tuple[int, int], *, timed_out: bool) -> FlushResult:
        stats = self.stats()
        return FlushResult(
            delivered=stats.delivered - before[0],
            dropped=stats.dropped - before[1],
            pending=stats.queued + stats.in_flight,
            timed_out=timed_out,
        )


_dumps = orjson.dumps  # the one orjson call outside _events: inlined in track(), the hot path
_encode_time, _USER_JSON = ev.encode_time, ev.USER_JSON
_next_id = ev.ready_ids.pop


def _rank(ordered: list[float], quantile: float) -> float | None:
    """The nearest-rank ``quantile`` of ``ordered`` (sorted), or None when it is empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def _snapshot(
    ledger: Ledger, intake: Intake, scheduler: Scheduler, runner: Runner, *, delays: bool
) -> Stats:
    """One client's :class:`Stats`, from its parts (the metrics read it without the delays,
    whose percentiles cost a sort)."""
    dropped = dict(ledger.dropped)
    ordered = sorted(ledger.delays.copy()) if delays else []  # copy(): one step
    return Stats(
        tracked=intake.end + ledger.refused - ledger.identified,
        identified=ledger.identified,
        spooled=ledger.spooled,
        replayed=ledger.replayed,
        delivered=ledger.delivered,
        dropped=sum(dropped.values()),
        dropped_by_reason=dropped,
        retried=ledger.retried,
        queued=len(intake) + scheduler.retained_events,
        queued_bytes=intake.bytes
        + ITEM_OVERHEAD * (len(intake) + scheduler.retained_events)
        + scheduler.retained_bytes,
        in_flight=scheduler.in_flight_events,
        batches_in_flight=len(scheduler.in_flight),
        max_batch_bytes_learned=scheduler.body_limit.fits,
        last_error=ledger.last_error,
        sent=ledger.sent,
        send_failed=ledger.send_failed,
        sending=len(runner.sending),
        delivery_delay_p50=_rank(ordered, 0.50),
        delivery_delay_p99=_rank(ordered, 0.99),
    )
