"""One HTTP request to the ingestion API and what its answer means (WIRE.md §4)."""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import AsyncGenerator, Callable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Literal, cast

import anyio
import attrs
import httpx

from ._events import rejected_count
from ._version import __version__

SDK_NAME = "whisperr-python-async"
USER_AGENT = f"{SDK_NAME}/{__version__}"
RETRY_AFTER_CAP = 60.0
# A batch answer is a few hundred bytes: this bounds what a misbehaving server makes us hold.
MAX_ANSWER_BYTES = 1 << 20
_TOO_LARGE = f"answer larger than {MAX_ANSWER_BYTES} bytes"

Kind = Literal["ok", "auth", "retry", "drop", "too_large"]

if TYPE_CHECKING:
    from typing import TypeAlias

    from ._http11 import Http1Transport

    # What the client's requests go through: its own transport, called directly, or an httpx
    # client (around a configured ``transport``, or ``http_client``, or the proxy).
    Pool: TypeAlias = httpx.AsyncClient | Http1Transport


@attrs.frozen
class Outcome:
    """The class of one answer (or of its absence) and the details the client acts on."""

    kind: Kind
    reason: str
    message: str
    status: int | None = None
    retry_after: float | None = None
    rejected: int = 0
    connecting: bool = False  # no connection could be made (DNS, refused, TLS, proxy)
    answer: bytes = attrs.field(default=b"", repr=False)  # the answer's body, decoded


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


def classify(
    status: int, headers: httpx.Headers, content: bytes, now: float, url: httpx.URL
) -> Outcome:
    """Map an HTTP answer to what the client must do with the request's events."""
    if 200 <= status < 300:
        rejected = rejected_count(content) if url.path.endswith("/batch") else 0
        return Outcome("ok", "ok", "delivered", status, rejected=rejected, answer=content)
    if status in (401, 403):
        return Outcome(
            "auth", "unauthorized", f"the API key was rejected ({status})", status, answer=content
        )
    if status == 429 or status >= 500:
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(headers.get("retry-after"), now)
        reason = "rate_limited" if status == 429 else "server_error"
        return Outcome(
            "retry", reason, f"the server answered {status}", status, retry_after, answer=content
        )
    if status == 413:
        return Outcome(
            "too_large", "payload_too_large", "the server answered 413", status, answer=content
        )
    if 300 <= status < 400:
        return Outcome(
            "drop",
            "redirected",
            f"the server answered {status} to POST {url}; redirects are never followed "
            "with the API key, check base_url",
            status,
            answer=content,
        )
    return Outcome(
        "drop", "rejected", f"the server rejected POST {url} ({status})", status, answer=content
    )


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
            # Nothing compressed is asked for; an answer compressed anyway is decoded in bounds.
            "Accept-Encoding": "identity",
        }
    )


async def post(
    pool: Pool,
    url: httpx.URL,
    headers: httpx.Headers,
    body: bytes,
    timeout: float,
    clock: Callable[[], float],
) -> Outcome:
    """Send one request and classify its answer, within one deadline for the whole exchange.

    This is the one boundary between the client and any transport: every failure to get a
    whole answer becomes a retry outcome, never an exception (no traceback, which would carry
    the request's headers in its frames, is logged). The answer is read within
    :data:`MAX_ANSWER_BYTES`, on the wire and again decoded; a body over the bound or that does
    not decode is left out, and the status alone classifies the answer.
    """
    try:
        if isinstance(pool, httpx.AsyncClient):
            with anyio.fail_after(timeout):
                status, answer_headers, content = await _through_httpx(
                    pool, url, headers, body, timeout
                )
        else:  # its deadline covers the whole exchange, and a timeout names the phase
            status, raw, content = await pool.post(url, headers.raw, body, timeout)
            answer_headers = httpx.Headers(raw)
            content = _decoded(content, answer_headers)
    except (TimeoutError, httpx.TimeoutException) as exc:
        connecting = isinstance(exc, httpx.ConnectTimeout)
        why = f" ({type(exc).__name__}: {exc})" if isinstance(exc, httpx.TimeoutException) else ""
        return Outcome(
            "retry",
            "timeout",
            f"the request timed out after {timeout:g}s{why}",
            connecting=connecting,
        )
    except Exception as exc:  # a transport's failure is an outcome, never a crash
        return Outcome(
            "retry",
            "network_error",
            f"the request failed ({type(exc).__name__}: {exc})",
            connecting=isinstance(exc, httpx.ConnectError),
        )
    return classify(status, answer_headers, content, clock(), url)


async def _through_httpx(
    client: httpx.AsyncClient, url: httpx.URL, headers: httpx.Headers, body: bytes, timeout: float
) -> tuple[int, httpx.Headers, bytes]:
    request = client.build_request("POST", url, content=body, headers=headers, timeout=timeout)
    response = await client.send(request, stream=True, follow_redirects=False)
    try:
        if response.is_stream_consumed:  # made with content= (httpx.MockTransport)
            content = response.content
        else:
            content = await _read(response)
    finally:
        await response.aclose()
    return response.status_code, response.headers, content


async def _read(response: httpx.Response) -> bytes:
    """The answer's body, within the bound, decoded; b"" when it does not decode (its status
    still says what became of the request)."""
    raw = bytearray()
    chunks = cast("AsyncGenerator[bytes, None]", response.aiter_raw())  # a generator, in fact
    async with contextlib.aclosing(chunks):  # closed when cut short
        async for chunk in chunks:
            raw += chunk
            if len(raw) > MAX_ANSWER_BYTES:
                return b""  # cut at the bound (the rest is never read)
    return _decoded(bytes(raw), response.headers)


def _decoded(content: bytes, headers: httpx.Headers) -> bytes:
    """:func:`decode` by the answer's Content-Encoding; b"" over the bound or undecodable."""
    if len(content) > MAX_ANSWER_BYTES:
        return b""
    try:
        return decode(content, headers.get_list("content-encoding", split_commas=True))
    except httpx.DecodingError:
        return b""


def decode(content: bytes, encodings: list[str]) -> bytes:
    """``content`` with its Content-Encodings (gzip, deflate) undone, within MAX_ANSWER_BYTES.

    Raises:
        httpx.DecodingError: an unknown encoding, corrupt data, or more than the bound.
    """
    for encoding in reversed([e.strip().lower() for e in encodings if e.strip()]):
        if encoding == "identity":
            continue
        if encoding in ("gzip", "x-gzip"):
            wbits = 16 + zlib.MAX_WBITS
        elif encoding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
            wbits = zlib.MAX_WBITS if content[:1] == b"\x78" else -zlib.MAX_WBITS
        else:
            raise httpx.DecodingError(f"unsupported Content-Encoding {encoding!r:.40}")
        inflate = zlib.decompressobj(wbits)
        try:
            content = inflate.decompress(content, MAX_ANSWER_BYTES + 1)
        except zlib.error as exc:
            raise httpx.DecodingError(f"corrupt {encoding} answer: {exc}") from None
        if len(content) > MAX_ANSWER_BYTES:
            raise httpx.DecodingError(f"{_TOO_LARGE}, decoded")
        if not inflate.eof:
            raise httpx.DecodingError(f"truncated {encoding} answer")
    return content
