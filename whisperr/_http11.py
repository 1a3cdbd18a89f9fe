"""The client's default httpx transport: keep-alive HTTP/1.1 over anyio streams, framed by h11.

httpx's own transport (httpcore) spends about 0.45 ms of CPU on every request, whatever its size:
a pool that can queue and time out waiting requests, a cancel scope around every read and write,
proxies, HTTP/2. With at most 500 events a request that was a third of this SDK's CPU per event.
The runner already caps how many requests are in flight, sends every request whole, and reads
small answers, so this transport does only that: one write, reads until the answer is complete,
and the connection goes back to an idle list. It is used only when neither ``transport`` nor
``http_client`` is configured; httpx's client still builds the requests, never follows
redirects, and reads the answers.
"""

from __future__ import annotations

import select
import ssl
from typing import Any

import anyio
import anyio.abc
import h11
import httpx

# A batch answer is a few hundred bytes; this bounds what a misbehaving server can make us hold.
MAX_ANSWER_BYTES = 1 << 20
_READ_SIZE = 65536
_CLOSED = "the server closed the connection before its answer was complete"
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

_Origin = tuple[bytes, str, int]


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive; at most ``max_idle`` idle connections are kept per origin.

    It does not limit how many requests run at once: the client's runner does that.
    """

    def __init__(self, *, max_idle: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_idle = max_idle
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl_context = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        connection = await self._idle_connection(origin)
        if connection is None:
            connection = await self._connect(origin, timeouts.get("connect"))
        status, headers, content, reusable = await connection.exchange(request, body, timeouts)
        if reusable and not self._closed and len(self._idle.get(origin, ())) < self._max_idle:
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
            if connection.usable():
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
                        host, port, ssl_context=self._ssl_context, tls_hostname=host
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
        self._h11 = h11.Connection(h11.CLIENT)

    async def exchange(
        self, request: httpx.Request, body: bytes, timeouts: dict[str, float | None]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send ``request``; return the status, headers, body, and whether to keep the connection.

        The connection is closed when anything goes wrong, including cancellation.
        """
        conn = self._h11
        try:
            try:
                head = conn.send(
                    h11.Request(
                        method=request.method,
                        target=request.url.raw_path,
                        headers=request.headers.raw,
                    )
                )
                data = b"".join(
                    (
                        head or b"",
                        conn.send(h11.Data(data=body)) or b"",
                        conn.send(h11.EndOfMessage()) or b"",
                    )
                )
            except h11.LocalProtocolError as exc:
                raise httpx.LocalProtocolError(str(exc)) from exc
            try:
                with anyio.fail_after(timeouts.get("write")):
                    await self._stream.send(data)
            except TimeoutError as exc:
                raise httpx.WriteTimeout("sending the request timed out") from exc
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise httpx.WriteError(f"sending the request failed: {exc!r}") from exc
            try:
                with anyio.fail_after(timeouts.get("read")):
                    answer = await self._read_answer()
            except TimeoutError as exc:
                raise httpx.ReadTimeout("reading the answer timed out") from exc
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise httpx.ReadError(f"reading the answer failed: {exc!r}") from exc
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
        except BaseException:
            await self.aclose()
            raise
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return (*answer, reusable)

    async def _read_answer(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        conn = self._h11
        response: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        eof = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if eof:
                    raise h11.RemoteProtocolError(_CLOSED) from None
                raise
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive(_READ_SIZE)
                except anyio.EndOfStream:
                    data, eof = b"", True
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER_BYTES:
                    raise h11.RemoteProtocolError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response.status_code, list(response.headers), b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError(_CLOSED)
            # an InformationalResponse (1xx) is skipped

    def usable(self) -> bool:
        """False when an idle connection has something to read: the server closed it, or broke
        the protocol by sending unasked data."""
        sock: Any = self._stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if sock is None or sock.fileno() < 0:
            return False
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self._stream)
