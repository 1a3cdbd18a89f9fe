"""The client's default httpx transport: keep-alive HTTP/1.1 over anyio streams, parsed by h11.

httpx's own transport (httpcore, with h11) spends about 0.45 ms of CPU on every request whatever
its size: a pool that can queue and time out waiting requests, a cancel scope around every read
and write, proxies, HTTP/2. The runner already caps how many requests are in flight and sends
every request whole, so this transport keeps only what a batch request needs around h11, which
frames the request and parses the answer:

- one deadline for the whole exchange, the connect included (httpx's per-read timeout lets a
  slow drip last for ever);
- bounded heads (:data:`MAX_HEAD_BYTES`) and bodies (:data:`MAX_ANSWER_BYTES`, counted on the
  wire: decoding is the client's, within its own bound);
- a connection is reused only after a whole, clean exchange, and only if, idle, it neither
  outlived :data:`IDLE_EXPIRY` (or half the server's ``Keep-Alive: timeout=``) nor received
  anything;
- a reused connection that dies before any answer byte is the server's idle close racing the
  request: the request is sent again at once on a new connection (every event carries its
  ``$message_id``, so a repeat is stored once);
- every failure leaves as an ``httpx.TransportError``.

It is used when neither ``transport`` nor ``http_client`` is configured and no proxy applies.
The client then calls :meth:`Http1Transport.post` itself: an ``httpx.AsyncClient`` around it
(building the request, merging headers and cookies, the redirect and auth machinery, the
response's model) took more CPU than the exchange. Under an ``httpx.AsyncClient`` it is an
ordinary httpx transport too (:meth:`Http1Transport.handle_async_request`), with the same
exchange.
"""

from __future__ import annotations

import contextlib
import select
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls
import h11
import httpx

from ._transport import MAX_ANSWER_BYTES

MAX_HEAD_BYTES = 1 << 16
# Seconds an idle connection is kept: below the idle timeouts of common servers (gunicorn 2 s,
# uvicorn 5 s), and above the 1 s flush interval, so that a steady trickle reuses one connection.
IDLE_EXPIRY = 1.5
_READ_SIZE = 65536
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_CLOSED = "the server closed the connection before its answer was complete"
_TOO_LARGE = f"answer larger than {MAX_ANSWER_BYTES} bytes"

_Origin = tuple[bytes, str, int]
_Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
# What can go wrong on a stream: the network, the TLS layer, the peer closing.
_STREAM_ERRORS = (
    OSError,
    ssl.SSLError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class _Stale(Exception):
    """A reused connection died before any byte of its answer."""


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive; at most ``max_idle`` idle connections are kept per origin.

    It does not limit how many requests run at once: the client's runner does that.
    ``ssl_context`` is called on the first https connect (making one takes ~15 ms).
    """

    def __init__(
        self,
        *,
        max_idle: int,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        idle_expiry: float = IDLE_EXPIRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_idle = max_idle
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._make_ssl_context = ssl_context or (lambda: httpx.create_ssl_context(trust_env=False))
        self._ssl_context: ssl.SSLContext | None = None
        self._idle_expiry = idle_expiry
        self._clock = clock
        self._closed = False

    async def post(
        self,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float | None,
    ) -> _Answer:
        """POST ``body`` to ``url``: the client's own path, with no httpx client around it.

        ``headers`` are sent as given, after ``Host`` and before ``Content-Length``. Returns the
        answer's status, headers and body (not decoded).
        """
        fields = [(b"Host", url.netloc), *headers, (b"Content-Length", b"%d" % len(body))]
        head = _head(b"POST", url.raw_path, fields)  # checked before any connection is taken
        return await self._exchange(url, head, body, timeout)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The same exchange as :meth:`post` under an ``httpx.AsyncClient``."""
        body = await request.aread()
        head = _head(request.method.encode("ascii"), request.url.raw_path, request.headers.raw)
        timeout = request.extensions.get("timeout", {}).get("read")
        status, headers, content = await self._exchange(request.url, head, body, timeout)
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _exchange(
        self, url: httpx.URL, head: h11.Request, body: bytes, timeout: float | None
    ) -> _Answer:
        # the ASCII (IDNA) form of the host, as it is resolved and as its certificate names it
        host = url.raw_host.decode("ascii")
        origin = (url.raw_scheme, host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80))
        connection: _Connection | None = None
        try:
            with anyio.fail_after(timeout):
                connection = await self._idle_connection(origin)
                if connection is not None:
                    try:
                        answer = await connection.exchange(head, body, stale=True)
                    except _Stale:
                        await connection.aclose()
                        connection = None
                if connection is None:
                    connection = await self._connect(origin)
                    answer = await connection.exchange(head, body)
        except TimeoutError:
            if connection is None:
                raise httpx.ConnectTimeout(f"connecting to {host}:{origin[2]} timed out") from None
            error = httpx.ReadTimeout if connection.reading else httpx.WriteTimeout
            raise error(f"{connection.phase} from {host}:{origin[2]} timed out") from None
        finally:
            if connection is not None and not connection.reusable:
                await connection.aclose()
        if connection.reusable and not self._closed:
            await self._keep(origin, connection)
        elif connection.reusable:  # the transport closed meanwhile: nothing will reuse it
            await connection.aclose()
        return answer

    async def _idle_connection(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            # A connection idle for long may have been dropped silently on the way (a NAT, a
            # load balancer), or be about to be closed by the server.
            if self._clock() < connection.expires and await connection.usable():
                return connection
            await connection.aclose()
        return None

    async def _keep(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_idle:
            await connection.aclose()
            return
        expiry = self._idle_expiry
        if connection.keep_alive_timeout is not None:
            expiry = min(expiry, connection.keep_alive_timeout / 2)
        connection.expires = self._clock() + expiry
        idle.append(connection)

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port = origin
        try:
            if scheme == b"https":
                if self._ssl_context is None:
                    self._ssl_context = self._make_ssl_context()
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                    host,
                    port,
                    ssl_context=self._ssl_context,
                    tls_hostname=host,
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(host, port)
        except _STREAM_ERRORS as exc:  # EndOfStream: closed during the TLS handshake
            raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc!r}") from None
        return _Connection(stream)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()


class _Connection:
    """One connection and its h11 state; ``exchange`` sends a request and reads its answer."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._socket: Any = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self._tls = stream.extra(anyio.streams.tls.TLSAttribute.ssl_object, None) is not None
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reading = False
        self.reusable = False
        self.expires = 0.0
        self.keep_alive_timeout: float | None = None

    @property
    def phase(self) -> str:
        return "reading the answer" if self.reading else "sending the request"

    async def exchange(self, head: h11.Request, body: bytes, *, stale: bool = False) -> _Answer:
        """Send a request; return its status, headers and body (as sent: not decoded).

        ``stale``: this connection was idle, and dying before any answer byte raises
        :class:`_Stale`. ``reusable`` says, afterwards, whether the connection may be kept.
        """
        conn = self._h11
        self.reusable = self.reading = False
        received = 0
        try:
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            data = conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            try:
                await self._stream.send(data)
                self.reading = True
            except _STREAM_ERRORS:
                if stale:
                    raise _Stale from None
                # A server may answer early (413) and close without reading the body: read on
                # (a failure now is the write's).
            status, headers, content, trusted = 0, [], bytearray(), False
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await self._stream.receive(_READ_SIZE)
                    except anyio.EndOfStream:
                        data = b""
                    if not (data or received) and stale:
                        raise _Stale
                    received += len(data)
                    if received > MAX_HEAD_BYTES + MAX_ANSWER_BYTES:
                        raise httpx.RemoteProtocolError(_TOO_LARGE)
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, event.headers.raw_items()
                    trusted = _check_framing(event.headers)
                elif isinstance(event, h11.Data):
                    content += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError(_CLOSED)
                # else h11.InformationalResponse (1xx): the real answer follows
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(f"the request is malformed: {exc}") from None
        except h11.RemoteProtocolError as exc:
            if not received:
                raise httpx.RemoteProtocolError(_CLOSED) from None
            raise httpx.RemoteProtocolError(f"malformed answer: {exc}") from None
        except _STREAM_ERRORS as exc:
            if stale and not received and isinstance(exc, (OSError, anyio.BrokenResourceError)):
                raise _Stale from None  # a reset instead of a clean close
            error = httpx.ReadError if self.reading else httpx.WriteError
            raise error(f"{self.phase} failed: {exc!r}") from None
        # Kept only after a clean exchange that both sides may follow with another, with nothing
        # unasked behind the answer.
        self.reusable = (
            trusted
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        )
        self.keep_alive_timeout = _keep_alive_timeout(headers)
        return status, headers, bytes(content)

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


def _check_framing(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Refuse at once an answer that announces a body over the bound (h11 checked the digits);
    return whether its framing is unambiguous (an answer with both a Content-Length and a
    Transfer-Encoding is read as chunked, as h11 does, but its connection is not trusted again).
    """
    names = set()
    for name, value in headers:
        names.add(name)
        if name == b"content-length" and int(value) > MAX_ANSWER_BYTES:
            raise httpx.RemoteProtocolError(_TOO_LARGE)
    return not {b"content-length", b"transfer-encoding"} <= names


def _head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """The request's line and headers as h11 frames them, refusing anything malformed."""
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(f"the request is malformed: {exc}") from None


def _keep_alive_timeout(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The ``timeout=`` of a ``Keep-Alive`` answer header: how long the server keeps it idle."""
    for name, value in headers:
        if name.lower() == b"keep-alive":
            for part in value.split(b","):
                key, _, number = part.strip().partition(b"=")
                if key.strip().lower() == b"timeout" and number.strip().isdigit():
                    return float(number.strip())
    return None
