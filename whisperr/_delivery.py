"""Delivery: one batch's request life, from its body to the outcome of its last attempt.

Lifetime: one per client. A connection pool belongs to the event loop it was made in: each
stay of the runner in a host opens its own (:meth:`Delivery.open`) and closes it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from . import _events as ev
from ._batches import Batch
from ._config import Settings
from ._errors import ConfigError
from ._http11 import IDLE_EXPIRY, Http1Transport
from ._ledger import Ledger
from ._models import DeliveryReport
from ._send import SendJob
from ._transport import Outcome, backoff, post, request_headers

if TYPE_CHECKING:
    from ._transport import Pool

logger = logging.getLogger("whisperr")


class Delivery:
    """The endpoints, headers, network settings and retry rules of one client's requests."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self.ledger = ledger
        self._url_batch = httpx.URL(f"{settings.base_url}/v1/events/batch")
        self._url_identify = httpx.URL(f"{settings.base_url}/v1/identify")
        self._url_track = httpx.URL(f"{settings.base_url}/v1/events/track")
        self._headers = request_headers(settings.api_key or "")
        self.proxy = proxy_for(settings)
        self._ssl_context: ssl.SSLContext | None = None
        self._failing = False  # since the last answer that was not worth retrying
        # The metrics' request histogram (endpoint, outcome kind, seconds), when metrics are on.
        self.on_request: Callable[[str, str, float], None] | None = None

    def open(self) -> Pool:
        """A pool for the event loop about to serve: the default transport, called directly,
        or an httpx client (around a configured ``transport`` or the proxy; the caller's
        ``http_client`` as is)."""
        s = self._settings
        if s.http_client is not None:
            return s.http_client
        transport = s.transport
        if transport is None and self.proxy is not None:
            transport = httpx.AsyncHTTPTransport(
                proxy=self.proxy,
                verify=self.ssl_context(),
                trust_env=False,
                limits=httpx.Limits(
                    max_connections=None,
                    max_keepalive_connections=s.max_concurrency,
                    keepalive_expiry=IDLE_EXPIRY,
                ),
            )
        elif transport is None:
            return Http1Transport(max_idle=s.max_concurrency, ssl_context=self.ssl_context)
        return httpx.AsyncClient(transport=transport, trust_env=False)

    def ssl_context(self) -> ssl.SSLContext:
        """What https connections trust: ``verify``, and with ``trust_env`` SSL_CERT_FILE or
        SSL_CERT_DIR, as httpx reads them; made once (~15 ms), on the first need."""
        if self._ssl_context is None:
            verify = self._settings.verify
            if isinstance(verify, ssl.SSLContext):
                self._ssl_context = verify
            elif isinstance(verify, str):
                self._ssl_context = (
                    ssl.create_default_context(capath=verify)
                    if os.path.isdir(verify)
                    else ssl.create_default_context(cafile=verify)
                )
            else:
                self._ssl_context = httpx.create_ssl_context(
                    verify=verify, trust_env=self._settings.trust_env
                )
        return self._ssl_context

    async def close(self, http: Pool) -> None:
        """Close a pool from :meth:`open`, unless it was passed in as ``http_client``."""
        if self._settings.http_client is None:
            await http.aclose()

    async def attempts(
        self, http: Pool, batch: Batch, attempted: Callable[[Outcome], None]
    ) -> Outcome:
        """Send ``batch`` until it gets an answer that is not worth retrying, or retries run out.

        ``attempted`` is called with each attempt's outcome (the whole-client backoff).
        """
        s = self._settings
        url = self._url_identify if batch.identify else self._url_batch
        body = batch.bodies[0] if batch.identify else ev.batch_body(batch.bodies)
        attempt = 0
        endpoint = "identify" if batch.identify else "batch"
        while True:
            outcome = await self._post(http, endpoint, url, body, s.request_timeout)
            attempted(outcome)
            self._note(outcome)
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

    async def send_now(self, http: Pool, job: SendJob) -> None:
        """Make ``job``'s requests until an answer settles it or its deadline is near.

        The same body (so the same ``$message_id`` and ``occurred_at``) goes on every attempt;
        429/5xx/network failures and timeouts are retried with the batches' backoff and
        Retry-After rules, as long as the wait and another attempt fit before the deadline.
        """
        s = self._settings
        url = self._url_identify if job.identify else self._url_track
        attempts = 0
        while True:
            remaining = job.remaining()
            if remaining <= 0:
                job.fail(job.stopped("the send's timeout passed before an attempt", attempts))
                return
            timeout = min(s.request_timeout, remaining)
            endpoint = "identify" if job.identify else "track"
            outcome = await self._post(http, endpoint, url, job.body, timeout)
            attempts += 1
            if outcome.kind == "ok":
                job.succeed(outcome, attempts)
                return
            if outcome.kind != "retry":
                job.fail(job.error_from(outcome, attempts))
                return
            delay = outcome.retry_after
            if delay is None:
                delay = backoff(attempts - 1, s.backoff_base, s.backoff_cap)
            if delay >= job.remaining():
                why = f"; {attempts} attempts, and the next would not fit in the send's timeout"
                job.fail(job.error_from(outcome, attempts, why))
                return
            await s.sleep(delay)

    async def _post(
        self, http: Pool, endpoint: str, url: httpx.URL, body: bytes, timeout: float
    ) -> Outcome:
        if self.on_request is None:
            return await post(http, url, self._headers, body, timeout, self._settings.clock)
        started = time.perf_counter()
        outcome = await post(http, url, self._headers, body, timeout, self._settings.clock)
        self.on_request(endpoint, outcome.kind, time.perf_counter() - started)
        return outcome

    def _note(self, outcome: Outcome) -> None:
        """One WARNING for the first failed attempt of a stretch, naming the cause."""
        if outcome.kind != "retry":
            self._failing = False
            return
        if self._failing:
            return
        self._failing = True
        where = ""
        if outcome.connecting:
            where = (
                f"; through the proxy {_shown(self.proxy)}"
                if self.proxy
                else "; no proxy in use (set HTTPS_PROXY or proxy= if this network needs one)"
            )
        logger.warning(
            "whisperr: delivery to %s is failing, retrying: %s%s",
            self._url_batch.copy_with(path="/"),
            outcome.message,
            where,
        )


def proxy_for(settings: Settings) -> str | None:
    """The proxy the client's requests go through: ``proxy``, else (with ``trust_env``) the one
    HTTP_PROXY, HTTPS_PROXY or ALL_PROXY name for base_url's scheme, unless NO_PROXY excludes
    its host. These are read as urllib reads them (lower-case names first), once per client.

    Raises:
        ConfigError: a SOCKS proxy without ``httpx[socks]`` installed.
    """
    proxy = settings.proxy
    if proxy is None and settings.trust_env:
        url = httpx.URL(settings.base_url)
        proxies = urllib.request.getproxies_environment()
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if not bypass(url.host, proxies):
            proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    if proxy.startswith("socks") and importlib.util.find_spec("socksio") is None:
        raise ConfigError(
            f"the proxy {_shown(proxy)} needs SOCKS support: pip install 'httpx[socks]'"
        )
    return proxy


def _shown(proxy: str | None) -> str:
    """A proxy URL fit for a log: without its credentials."""
    return str(httpx.URL(proxy or "").copy_with(username=None, password=None))
