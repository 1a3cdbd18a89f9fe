"""Delivery: one batch's request life, from its body to the outcome of its last attempt.

Lifetime: one per client. A connection pool belongs to the event loop it was made in: each
stay of the runner in a host opens its own (:meth:`Delivery.open`) and closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from . import _events as ev
from ._batches import Batch
from ._config import Settings
from ._http11 import Http1Transport
from ._ledger import Ledger
from ._models import DeliveryReport
from ._transport import Outcome, backoff, post, request_headers

logger = logging.getLogger("whisperr")


class Delivery:
    """The endpoints, headers and retry rules of one client's requests."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self.ledger = ledger
        self._url_batch = httpx.URL(f"{settings.base_url}/v1/events/batch")
        self._url_identify = httpx.URL(f"{settings.base_url}/v1/identify")
        self._headers = request_headers(settings.api_key or "")

    def open(self) -> httpx.AsyncClient:
        """A pool for the event loop about to serve (the caller's ``http_client`` as is)."""
        s = self._settings
        return s.http_client or httpx.AsyncClient(
            transport=s.transport or Http1Transport(max_idle=s.max_concurrency), trust_env=False
        )

    async def close(self, http: httpx.AsyncClient) -> None:
        """Close a pool from :meth:`open`, unless it was passed in as ``http_client``."""
        if self._settings.http_client is None:
            await http.aclose()

    async def attempts(
        self, http: httpx.AsyncClient, batch: Batch, attempted: Callable[[Outcome], None]
    ) -> Outcome:
        """Send ``batch`` until it gets an answer that is not worth retrying, or retries run out.

        ``attempted`` is called with each attempt's outcome (the whole-client backoff).
        """
        s = self._settings
        url = self._url_identify if batch.identify else self._url_batch
        body = batch.bodies[0] if batch.identify else ev.batch_body(batch.bodies)
        attempt = 0
        while True:
            outcome = await post(http, url, self._headers, body, s.request_timeout, s.clock)
            attempted(outcome)
            if outcome.kind != "retry" or attempt >= s.max_retries:
                return outcome
            batch.failure = outcome.reason
            batch.last_failure = outcome.message
            delay = outcome.retry_after
            if delay is None:
                delay = backoff(attempt, s.backoff_base, s.backoff_cap)
            logger.debug("whisperr: %s; retrying in %.2fs", outcome.message, delay)
            count = len(batch.items)
            self.ledger.retry(
                count,
                DeliveryReport(
                    "retrying", outcome.reason, outcome.message, outcome.status, count, ()
                ),
            )
            attempt += 1
            await s.sleep(delay)
