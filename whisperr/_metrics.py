"""The client's own OpenTelemetry metrics (``metrics=True`` or ``meter_provider=``).

Lifetime: one per meter provider, shared by the clients that report to it (instruments are
made once per provider: a second set of the same names would be ignored). Needs
``opentelemetry-api`` (the ``otel`` extra), imported only then. The counts are observable
instruments whose callbacks sum the clients' ``stats()``, so they equal it (for one client)
and cost nothing on the ``track()`` path; a client that is garbage-collected leaves its final
counts in the sums, so the counters never go down. The two histograms are recorded by the
runners, once a request and once a delivered batch.

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

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import ConfigError
from ._models import Stats
from ._version import __version__

# Request bucket bounds (seconds): loopback to a slow far server, and the retries' timeouts.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Delay bucket bounds (seconds): a batch's wait (flush_interval) up to an outage's backlog.
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


# The instruments made so far, by meter provider: id -> (the provider, kept alive, its Metrics).
_BY_PROVIDER: dict[int, tuple[Any, Metrics]] = {}
_MADE = threading.Lock()
_COUNTS = ("tracked", "identified", "delivered", "retried", "sent", "send_failed")
_GAUGES = ("queued", "queued_bytes", "in_flight")


class Metrics:
    """The instruments on one meter provider, and the clients that report to them."""

    @classmethod
    def of(cls, meter_provider: Any) -> Metrics:
        """The instruments on ``meter_provider`` (None: the global provider), made once."""
        try:
            from opentelemetry import metrics
        except ImportError:
            raise ConfigError(
                "metrics need the OpenTelemetry API: pip install 'whisperr-async[otel]'"
            ) from None
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        if not callable(getattr(provider, "get_meter", None)):
            raise ConfigError(
                f"meter_provider must be an OpenTelemetry MeterProvider, got {provider!r:.200}"
            )
        with _MADE:
            known = _BY_PROVIDER.get(id(provider))
            if known is None or known[0] is not provider:
                known = _BY_PROVIDER[id(provider)] = (provider, cls(provider, metrics))
            return known[1]

    def __init__(self, provider: Any, metrics: Any) -> None:
        meter = provider.get_meter("whisperr", __version__)
        observation = metrics.Observation
        self._lock = threading.Lock()
        self._clients: dict[object, Callable[[], Stats]] = {}  # a key per client -> its counts
        self._retired: Counter[str] = Counter()  # final counts of clients collected since

        def counts(field: str) -> Callable[[Any], Iterable[Any]]:
            return lambda options: [observation(self._sum()[field])]

        def dropped(options: Any) -> Iterable[Any]:
            sums = self._sum()
            return [
                observation(n, {"reason": key.removeprefix("dropped:")})
                for key, n in sums.items()
                if key.startswith("dropped:")
            ]

        def sends(options: Any) -> Iterable[Any]:
            sums = self._sum()
            return [
                observation(sums["sent"], {"outcome": "sent"}),
                observation(sums["send_failed"], {"outcome": "failed"}),
            ]

        event, size = "{event}", "By"
        for name, unit, callback, description in (
            ("events.tracked", event, counts("tracked"), "Events tracked"),
            ("identifies", "{identify}", counts("identified"), "Identifies taken"),
            ("events.delivered", event, counts("delivered"), "Events delivered"),
            ("events.dropped", event, dropped, "Events never delivered, by reason"),
            ("events.retried", event, counts("retried"), "Events in retried attempts"),
            ("sends", "{send}", sends, "Events sent now (send, identify_now), by outcome"),
        ):
            meter.create_observable_counter(
                f"whisperr.{name}", callbacks=[callback], unit=unit, description=description
            )
        for name, unit, callback, description in (
            ("queue.events", event, counts("queued"), "Events queued or kept"),
            ("queue.size", size, counts("queued_bytes"), "Bytes of events queued"),
            ("events.in_flight", event, counts("in_flight"), "Events being sent"),
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

    def watch(self, client: object, counts: Callable[[], Stats]) -> None:
        """Report ``client``'s ``counts`` (a function of its parts, not of the client, so that
        it can be read once more when the client is collected)."""
        key = object()
        with self._lock:
            self._clients[key] = counts
        weakref.finalize(client, self._retire, key)

    def _retire(self, key: object) -> None:
        with self._lock:
            counts = self._clients.pop(key)
            self._retired.update(_cumulative(counts()))

    def _sum(self) -> Counter[str]:
        with self._lock:
            readers = list(self._clients.values())
            sums = Counter(self._retired)
        for read in readers:
            stats = read()
            sums.update(_cumulative(stats))
            sums.update({field: getattr(stats, field) for field in _GAUGES})
        return sums

    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One request ended (on a runner's loop)."""
        self._requests.record(seconds, {"endpoint": endpoint, "outcome": outcome})

    def delivered(self, oldest_age: float) -> None:
        """A batch was acknowledged; ``oldest_age``: seconds since its oldest event occurred."""
        self._delays.record(oldest_age)


def _cumulative(stats: Stats) -> dict[str, int]:
    """The counts of ``stats`` that only grow, keyed for :meth:`Metrics._sum`."""
    counts = {field: getattr(stats, field) for field in _COUNTS}
    counts.update({f"dropped:{reason}": n for reason, n in stats.dropped_by_reason.items()})
    return counts
