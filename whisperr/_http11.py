"""The client's default httpx transport: keep-alive HTTP/1.1 over anyio streams.

httpx's own transport (httpcore, with h11) spends about 0.45 ms of CPU on every request whatever
its size: a pool that can queue and time out waiting requests, a cancel scope around every read
and write, a general HTTP/1.1 state machine, proxies, HTTP/2. With at most 500 events a request
that was a third of this SDK's CPU per event. The runner already caps how many requests are in
flight, sends every request whole with a Content-Length, and reads small answers, so this
transport does only that: it checks and writes the request in one piece, parses the answer
(Content-Length, chunked, or until close; 1xx skipped) within fixed bounds, and puts the
connection back on an idle list. It is used only when neither ``transport`` nor ``http_client``
is configured; httpx's client still builds the requests, never follows redirects, and reads the
answers.
"""

from __future__ import annotations

import contextlib
import re
import select
import ssl
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls
import httpx

# A batch answer is a few hundred bytes; these bound what a misbehaving server can make us hold.
MAX_ANSWER_BYTES = 1 << 20
MAX_HEAD_BYTES = 1 << 16
IDLE_EXPIRY = 5.0  # seconds an idle connection is kept, as httpx keeps them
_READ_SIZE = 65536
_CLOSED = "the server closed the connection before its answer was complete"
_TOO_LARGE = f"answer larger than {MAX_ANSWER_BYTES} bytes"
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
# RFC 9110/9112 grammar, strict where framing depends on it.
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TOKEN_CHARS)
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_FIELDS = re.compile(rb"(?:" + _TOKEN_CHARS + rb": [^\r\n\0]*\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN_CHARS + rb"):[ \t]*([^\r\n\0]*?)[ \t]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n\0]*)?")
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n\0]*)?")

_Origin = tuple[bytes, str, int]


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive; at most ``max_idle`` idle connections are kept per origin.

    It does not limit how many requests run at once: the client's runner does that.
    """

    def __init__(
        self,
        *,
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        idle_expiry: float = IDLE_EXPIRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_idle = max_idle
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl_context = ssl_context
        self._idle_expiry = idle_expiry
        self._clock = clock
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        # the ASCII (IDNA) form of the host, as it is resolved and as its certificate names it
        host = url.raw_host.decode("ascii")
        origin = (url.raw_scheme, host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        head = request_head(request, len(body))  # checked before any connection is taken
        connection = await self._idle_connection(origin)
        if connection is None:
            connection = await self._connect(origin, timeouts.get("connect"))
        status, headers, content, reusable = await connection.exchange(
            head + body, timeouts, head_only=request.method == "HEAD"
        )
        if reusable and not self._closed and len(self._idle.get(origin, ())) < self._max_idle:
            connection.idle_since = self._clock()
            self._idle.setdefault(origin, []).append(connection)
        else:
            await connection.aclose()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _idle_connection(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            # A connection idle for long may have been dropped silently on the way (a NAT, a
            # load balancer): using it would cost a whole read timeout.
            fresh = self._clock() - connection.idle_since < self._idle_expiry
            if fresh and await connection.usable():
                return connection
            await connection.aclose()
        return None

    async def _connect(self, origin: _Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        tls = scheme == b"https"
        if tls and self._ssl_context is None:
            # the trust store httpx would use; made on the first https connect (~15 ms)
            self._ssl_context = httpx.create_ssl_context(trust_env=False)
        try:
            with anyio.fail_after(timeout):
                stream: anyio.abc.ByteStream = (
                    await anyio.connect_tcp(
                        host,
                        port,
                        ssl_context=self._ssl_context,
                        tls_hostname=host,
                        tls_standard_compatible=False,
                    )
                    if tls
                    else await anyio.connect_tcp(host, port)
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
        return _Connection(stream)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()


class _Connection:
    """One connection; ``exchange`` sends a request and reads its whole answer."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._socket: Any = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._buffer = bytearray()  # received, not yet parsed
        self.idle_since = 0.0
        self._tls = stream.extra(anyio.streams.tls.TLSAttribute.ssl_object, None) is not None

    async def exchange(
        self, request: bytes, timeouts: dict[str, float | None], *, head_only: bool = False
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send ``request``; return the status, headers, body, and whether to keep the connection.

        The connection is closed when anything goes wrong, including cancellation.
        """
        writing = True
        try:
            # One deadline for the whole exchange (the read timeout): the request is sent in one
            # piece, and a cancel scope costs about as much as parsing the answer.
            with anyio.fail_after(timeouts.get("read")):
                try:
                    await self._stream.send(request)
                except (OSError, anyio.BrokenResourceError) as exc:
                    try:  # a server may answer early (413) and close without reading the body
                        status, headers, content, _ = await self._read_answer(head_only)
                    except Exception:
                        raise exc from None
                    return status, headers, content, False
                writing = False
                return await self._read_answer(head_only)
        except BaseException as exc:
            await self.aclose()
            doing = "sending the request" if writing else "reading the answer"
            if isinstance(exc, TimeoutError):
                timeout = httpx.WriteTimeout if writing else httpx.ReadTimeout
                raise timeout(f"{doing} timed out") from exc
            if isinstance(exc, (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)):
                error = httpx.WriteError if writing else httpx.ReadError
                raise error(f"{doing} failed: {exc!r}") from exc
            raise

    async def _read_answer(
        self, head_only: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        while True:  # informational (1xx) answers come before the real one
            status, version, headers = _parse_head(await self._read_until(b"\r\n\r\n"))
            if status >= 200:
                break
            if status == 101:
                raise httpx.RemoteProtocolError("the server switched protocols unasked")
        fields: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)
        tokens = b",".join(fields.get(b"connection", ())).lower().split(b",")
        keep = version == b"1" and b"close" not in (t.strip() for t in tokens)
        if fields.get(b"content-encoding", [b"identity"]) != [b"identity"]:
            raise httpx.RemoteProtocolError("the answer has a Content-Encoding; none was asked for")
        if status in (204, 304) or head_only:
            content = b""
        elif b"transfer-encoding" in fields:
            if b",".join(fields[b"transfer-encoding"]).strip().lower() != b"chunked":
                raise httpx.RemoteProtocolError("unsupported Transfer-Encoding in the answer")
            content = await self._read_chunked()
            keep = keep and b"content-length" not in fields  # both framings: do not trust it
        elif b"content-length" in fields:
            content = await self._read_exactly(_content_length(fields[b"content-length"]))
        else:  # the body runs until the server closes the connection
            content, keep = await self._read_to_end(), False
        return status, headers, content, keep and not self._buffer

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            raise httpx.RemoteProtocolError(_CLOSED) from None
        self._buffer += data

    async def _read_until(self, end: bytes) -> bytes:
        """The bytes before ``end`` (which is consumed), within MAX_HEAD_BYTES."""
        start = 0
        while (found := self._buffer.find(end, start)) < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes")
            start = max(0, len(self._buffer) - len(end) + 1)
            await self._fill()
        head = bytes(self._buffer[:found])
        del self._buffer[: found + len(end)]
        return head

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while size := _chunk_size(await self._read_until(b"\r\n")):
            total += size
            if total > MAX_ANSWER_BYTES:
                raise httpx.RemoteProtocolError(_TOO_LARGE)
            chunk = await self._read_exactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise httpx.RemoteProtocolError("malformed chunk in the answer")
            chunks.append(chunk[:-2])
        trailers = 0
        while await self._read_until(b"\r\n"):  # trailer fields, ignored, up to an empty line
            trailers += 1
            if trailers > 100:
                raise httpx.RemoteProtocolError("too many trailer fields in the answer")
        return b"".join(chunks)

    async def _read_to_end(self) -> bytes:
        while len(self._buffer) <= MAX_ANSWER_BYTES:
            try:
                self._buffer += await self._stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = bytes(self._buffer)
                self._buffer.clear()
                return data
        raise httpx.RemoteProtocolError(_TOO_LARGE)

    async def usable(self) -> bool:
        """False when an idle connection has something to read: the server closed it, or broke
        the protocol by sending unasked data."""
        if self._socket is None or self._socket.fileno() < 0:
            return False
        try:
            if hasattr(select, "poll"):  # select() fails on descriptors >= FD_SETSIZE
                poller = select.poll()
                poller.register(self._socket, select.POLLIN)
                if poller.poll(0):
                    return False
            elif select.select([self._socket], [], [], 0)[0]:
                return False
        except (OSError, ValueError):
            return False
        if self._tls:
            # Bytes the TLS layer already took off the socket: a receive in a cancelled scope
            # returns them (or an end) at once, and is cancelled when it holds none.
            with anyio.CancelScope() as probe:
                probe.cancel()
                with contextlib.suppress(Exception):
                    await self._stream.receive(1)
                return False
        return True

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self._stream)


def request_head(request: httpx.Request, body_size: int) -> bytes:
    """The request line and header block, refusing anything that could break the framing."""
    raw = request.headers.raw
    fields = b"".join(b"%b: %b\r\n" % field for field in raw)
    method, target = request.method.encode(), request.url.raw_path
    if (
        _FIELDS.fullmatch(fields) is None
        or fields.count(b"\n") != len(raw)  # a line break inside a value
        or fields.count(b"\r") != len(raw)
        or _TOKEN.fullmatch(method) is None
        or _TARGET.fullmatch(target) is None
    ):
        raise httpx.LocalProtocolError("the request has a malformed method, target or header")
    lengths = request.headers.get_list("content-length")
    if lengths != [str(body_size)] and (body_size or lengths):
        raise httpx.LocalProtocolError("a request body needs its Content-Length")
    return b"%b %b HTTP/1.1\r\n%b\r\n" % (method, target, fields)


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    status_line, *lines = head.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(status_line)
    if status is None:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:100]!r}")
    headers = []
    for line in lines:
        field = _FIELD.fullmatch(line)
        if field is None:
            raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}")
        headers.append((field[1], field[2]))
    return int(status[2]), status[1], headers


def _content_length(values: list[bytes]) -> int:
    if len(set(values)) != 1 or not values[0].isdigit():
        raise httpx.RemoteProtocolError(f"bad Content-Length in the answer: {values[:2]!r:.200}")
    digits = values[0].lstrip(b"0") or b"0"
    size = int(digits) if len(digits) <= 8 else MAX_ANSWER_BYTES + 1
    if size > MAX_ANSWER_BYTES:
        raise httpx.RemoteProtocolError(_TOO_LARGE)
    return size


def _chunk_size(line: bytes) -> int:
    size = _CHUNK.fullmatch(line)
    if size is None:
        raise httpx.RemoteProtocolError(f"malformed chunk size {line[:100]!r}")
    return int(size[1], 16)
