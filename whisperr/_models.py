"""The frozen records the client hands out: delivery reports, statistics, flush results and
the receipts of sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

ReportType = Literal["auth", "retry_exhausted", "dropped", "retrying", "spooled"]


@attrs.frozen
class DeliveryReport:
    """What the ``on_error`` hook receives when events were not delivered (yet).

    Attributes:
        type: ``"auth"`` (key rejected; events kept), ``"retry_exhausted"`` (retries used up;
            events kept for a later attempt), ``"dropped"`` (events will never be delivered) or
            ``"spooled"`` (with ``spool_path``: not delivered by this client, kept in the spool
            file for a later one; ``reason`` says why: ``"shutdown"``, ``"queue_overflow"``...);
            ``"retrying"`` only in ``stats().last_error``: an attempt failed and is retried
            (never handed to ``on_error``).
        reason: a finer cause, for example ``"unauthorized"``, ``"server_error"``,
            ``"rate_limited"``, ``"network_error"``, ``"rejected"``, ``"payload_too_large"``,
            ``"partially_rejected"``, ``"expired"``, ``"queue_overflow"``, ``"invalid"`` or
            ``"shutdown"``.
        message: a sentence for a human.
        status: the HTTP status, when there was a response.
        count: how many events the report is about.
        message_ids: their ``$message_id`` values, when known.
    """

    type: ReportType
    reason: str
    message: str
    status: int | None = None
    count: int = 0
    message_ids: tuple[str, ...] = ()


@attrs.frozen
class Stats:
    """A snapshot of the client's counters, in messages (tracks and identifies) but for
    ``batches_in_flight`` and ``max_batch_bytes_learned``.

    ``tracked`` counts ``track()`` calls and ``identified`` ``identify()`` calls (each queued,
    or refused at capture); the other counts take both. After ``aclose()`` every one is
    accounted for: ``tracked + identified == delivered + dropped``. ``retried`` counts the
    messages of attempts that failed and were retried (a batch of 500 retried twice: 1,000), not
    requests. ``queued`` includes messages kept after an auth failure or exhausted retries;
    ``in_flight`` counts the messages of the requests under way.
    ``max_batch_bytes_learned`` is the request body size, in bytes, that batches are cut to
    after the server answered 413 to larger ones (None while nothing was learned): set
    ``max_batch_bytes`` to it to spare those 413s.

    Sends (``send()``, ``identify_now()``) are counted apart, never in ``tracked``: ``sent``
    got a receipt, ``send_failed`` raised :class:`SendError`, ``sending`` are under way.

    ``delivery_delay_p50`` and ``delivery_delay_p99`` (seconds, None before the first
    delivery) summarise the last 4,096 delivered events: from each one's ``occurred_at`` to the
    server's acknowledgement (an ``occurred_at`` you passed counts from that time).
    ``dropped_by_reason["filtered"]`` counts the events ``before_send`` dropped.

    With a spool (``spool_path``): ``spooled`` counts the events this client left in the spool
    file undelivered (queue overflow, what was left at close) and ``replayed`` the events it
    took from the file, written by an earlier client or another process. After ``aclose()``:
    ``tracked + identified + replayed == delivered + dropped + spooled``. An event that goes to
    the file and back more than once (an overflow this client replays once the queue has
    room, then spools again at close) is counted each time, on both sides.
    """

    tracked: int
    delivered: int
    dropped: int
    dropped_by_reason: Mapping[str, int]
    retried: int
    queued: int
    queued_bytes: int
    in_flight: int
    batches_in_flight: int
    max_batch_bytes_learned: int | None
    last_error: DeliveryReport | None
    sent: int = 0
    send_failed: int = 0
    sending: int = 0
    delivery_delay_p50: float | None = None
    delivery_delay_p99: float | None = None
    identified: int = 0
    spooled: int = 0
    replayed: int = 0


@attrs.frozen
class FlushResult:
    """What a ``flush()`` or ``aclose()`` achieved.

    Attributes:
        delivered: events delivered while it ran.
        dropped: events dropped while it ran.
        pending: events still waiting when it returned (queued, kept after an auth failure or
            exhausted retries, or in flight).
        timed_out: whether it returned because its deadline passed.
    """

    delivered: int
    dropped: int
    pending: int
    timed_out: bool


@attrs.frozen
class Receipt:
    """What the server said about one event (or identify) delivered now.

    The answer's shape differs between the API's sources; every field is read leniently, and
    one the answer lacks (or gives with another type) is None, never an error.

    Attributes:
        message_id: the event's ``$message_id`` (``""`` for an identify).
        sent: False when the client is ``disabled``: validated, not sent.
        status: the HTTP status of the answer (None when not sent).
        attempts: how many requests were made (1 unless some were retried).
        event_id: ``event.id``.
        mapping_status: ``event.mapping_status`` (``"mapped"``, ``"pending"``, ...).
        processing: ``processing`` (``"queued"``, ``"durably_accepted"``, ...).
        delivery_id: ``delivery.delivery_id``.
        disposition: ``delivery.disposition``.
        duplicate: ``delivery.duplicate``: the server had stored this ``$message_id`` before.
        answer: the whole answer when it was a JSON object (``user``, ``job``, fields to come).
    """

    message_id: str
    sent: bool
    status: int | None
    attempts: int
    event_id: str | None = None
    mapping_status: str | None = None
    processing: str | None = None
    delivery_id: str | None = None
    disposition: str | None = None
    duplicate: bool | None = None
    answer: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
