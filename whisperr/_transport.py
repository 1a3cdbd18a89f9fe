"""One HTTP request to the ingestion API and what its answer means (WIRE.md §4)."""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Literal

import attrs
import httpx

from ._events import rejected_count
from ._version import __version__

SDK_NAME = "whisperr-python-async"
USER_AGENT = f"{SDK_NAME}/{__version__}"
RETRY_AFTER_CAP = 60.0

Kind = Literal["ok", "auth", "retry", "drop", "too_large"]


@attrs.frozen
class Outcome:
    """The class of one answer (or of its absence) and the details the client acts on."""

    kind: Kind
    reason: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    rejected: int = 0


def backoff(attempt: int, base: float, cap: float, jitter: float = 1.0) -> float:
    """Capped exponential backoff: ``min(cap, base * 2**attempt)``, less a random share of up
    to ``jitter`` of it (1.0: full jitter, uniform in [0, ceiling])."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return ceiling * random.uniform(1.0 - jitter, 1.0)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date), capped at 60 s.

    Returns None when the value is absent or unusable (negative, fractional, not a date).
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), RETRY_AFTER_CAP)


def classify(response: httpx.Response, now: float, batch: bool) -> Outcome:
    """Map an HTTP answer to what the client must do with the request's events."""
    status = response.status_code
    if 200 <= status < 300:
        rejected = rejected_count(response.content) if batch else 0
        return Outcome("ok", "ok", "delivered", status, rejected=rejected)
    if status in (401, 403):
        return Outcome("auth", "unauthorized", f"the API key was rejected ({status})", status)
    if status == 429 or status >= 500:
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        reason = "rate_limited" if status == 429 else "server_error"
        return Outcome("retry", reason, f"the server answered {status}", status, retry_after)
    if status == 413:
        return Outcome("too_large", "payload_too_large", "the server answered 413", status)
    if 300 <= status < 400:
        return Outcome(
            "drop",
            "redirected",
            f"the server answered {status}; redirects are never followed "
            "with the API key, check base_url",
            status,
        )
    return Outcome("drop", "rejected", f"the server rejected the request ({status})", status)


class _Headers(httpx.Headers):
    """Request headers whose repr leaves out the API key (httpx masks only Authorization)."""

    def __repr__(self) -> str:
        return f"<request headers: {', '.join(self.keys())}>"


def request_headers(api_key: str) -> httpx.Headers:
    """The headers of every request, built once per client."""
    return _Headers(
        {
            "X-API-Key": api_key,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",  # the answer's size is bounded only before decoding
        }
    )


async def post(
    client: httpx.AsyncClient,
    url: httpx.URL,
    headers: httpx.Headers,
    body: bytes,
    timeout: float,
    clock: Callable[[], float],
) -> Outcome:
    """Send one request; translate every failure to get an answer into a retry outcome."""
    try:
        response = await client.post(
            url, content=body, headers=headers, timeout=timeout, follow_redirects=False
        )
    except httpx.TimeoutException as exc:
        return Outcome("retry", "timeout", f"the request timed out ({type(exc).__name__}: {exc})")
    except httpx.RequestError as exc:  # transport errors, and a body that does not decode
        return Outcome(
            "retry", "network_error", f"the request failed ({type(exc).__name__}: {exc})"
        )
    return classify(response, clock(), batch=url.path.endswith("/batch"))
