"""The client's own OpenTelemetry metrics (``metrics=True`` or ``meter_provider=``).

Lifetime: one per client that has metrics on. Needs ``opentelemetry-api`` (the ``otel`` extra),
imported only then. The counts are observable instruments whose callbacks read
:meth:`AsyncClient.stats`, so they equal it and cost nothing on the ``track()`` path; the two
histograms are recorded by the runner, once a request and once a delivered batch.

    whisperr.events.tracked     counter          {event}   track() calls (queued or refused)
    whisperr.identifies         counter          {identify} identify() calls (the same)
    whisperr.events.delivered   counter          {event}   acknowledged (tracks and identifies)
    whisperr.events.dropped     counter          {event}   never delivered; attribute reason
    whisperr.events.retried     counter          {event}   events in attempts that were retried
    whisperr.sends              counter          {send}    send()/identify_now(); outcome
    whisperr.queue.events       up-down counter  {event}   queued and kept for a retry
    whisperr.queue.size         up-down counter  By        their bytes
    whisperr.events.in_flight   up-down counter  {event}   in requests under way
    whisperr.request.duration   histogram        s         each request; endpoint, outcome
    whisperr.delivery.delay     histogram        s         per delivered batch: the age of its
                                                           oldest event (from occurred_at)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._errors import ConfigError
from ._models import Stats
from ._version import __version__

# Request bucket bounds (seconds): loopback to a slow far server, and the retries' timeouts.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Delay bucket bounds (seconds): a batch's wait (flush_interval) up to an outage's backlog.
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The instruments of one client, on ``meter_provider`` (else the global provider)."""

    def __init__(self, meter_provider: Any, stats: Callable[[], Stats]) -> None:
        try:
            from opentelemetry import metrics
        except ImportError:
            raise ConfigError(
                "metrics need the OpenTelemetry API: pip install 'whisperr-async[otel]'"
            ) from None
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("whisperr", __version__)
        observation = metrics.Observation
        self._stats = stats

        def counts(read: Callable[[Stats], int]) -> Callable[[Any], Iterable[Any]]:
            return lambda options: [observation(read(stats()))]

        def dropped(options: Any) -> Iterable[Any]:
            by_reason = stats().dropped_by_reason
            return [observation(n, {"reason": reason}) for reason, n in by_reason.items()]

        def sends(options: Any) -> Iterable[Any]:
            now = stats()
            return [
                observation(now.sent, {"outcome": "sent"}),
                observation(now.send_failed, {"outcome": "failed"}),
            ]

        event, size = "{event}", "By"
        for name, unit, callback, description in (
            ("events.tracked", event, counts(lambda s: s.tracked), "Events tracked"),
            ("identifies", "{identify}", counts(lambda s: s.identified), "Identifies taken"),
            ("events.delivered", event, counts(lambda s: s.delivered), "Events delivered"),
            ("events.dropped", event, dropped, "Events never delivered, by reason"),
            ("events.retried", event, counts(lambda s: s.retried), "Events in retried attempts"),
            ("sends", "{send}", sends, "Events sent now (send, identify_now), by outcome"),
        ):
            meter.create_observable_counter(
                f"whisperr.{name}", callbacks=[callback], unit=unit, description=description
            )
        for name, unit, callback, description in (
            ("queue.events", event, counts(lambda s: s.queued), "Events queued or kept"),
            ("queue.size", size, counts(lambda s: s.queued_bytes), "Bytes of events queued"),
            ("events.in_flight", event, counts(lambda s: s.in_flight), "Events being sent"),
        ):
            meter.create_observable_up_down_counter(
                f"whisperr.{name}", callbacks=[callback], unit=unit, description=description
            )
        self._requests = meter.create_histogram(
            "whisperr.request.duration",
            unit="s",
            description="Duration of each request to the ingestion API",
            explicit_bucket_boundaries_advisory=list(REQUEST_BUCKETS),
        )
        self._delays = meter.create_histogram(
            "whisperr.delivery.delay",
            unit="s",
            description="Per delivered batch, the age of its oldest event when acknowledged",
            explicit_bucket_boundaries_advisory=list(DELAY_BUCKETS),
        )

    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One request ended (on the runner's loop)."""
        self._requests.record(seconds, {"endpoint": endpoint, "outcome": outcome})

    def delivered(self, oldest_age: float) -> None:
        """A batch was acknowledged; ``oldest_age``: seconds since its oldest event occurred."""
        self._delays.record(oldest_age)
