"""The frozen records the client hands out: delivery reports, statistics and flush results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs

ReportType = Literal["auth", "retry_exhausted", "dropped", "retrying"]


@attrs.frozen
class DeliveryReport:
    """What the ``on_error`` hook receives when events were not delivered (yet).

    Attributes:
        type: ``"auth"`` (key rejected; events kept), ``"retry_exhausted"`` (retries used up;
            events kept for a later attempt) or ``"dropped"`` (events will never be delivered);
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
    """A snapshot of the client's counters, in events (tracks and identifies) but for
    ``batches_in_flight`` and ``max_batch_bytes_learned``.

    After ``aclose()`` every tracked event is accounted for:
    ``tracked == delivered + dropped``. ``queued`` includes events kept after an auth failure
    or exhausted retries; ``in_flight`` counts the events of the requests under way.
    ``max_batch_bytes_learned`` is the request body size, in bytes, that batches are cut to
    after the server answered 413 to larger ones (None while nothing was learned): set
    ``max_batch_bytes`` to it to spare those 413s.
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
