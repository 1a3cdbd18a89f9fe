"""The default transport against a scripted HTTP server on 127.0.0.1, under asyncio and trio."""

from __future__ import annotations

import gzip
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs
import h11
import httpx
import pytest
import trustme
from anyio.streams.tls import TLSListener

import whisperr
from whisperr._http11 import MAX_ANSWER_BYTES, Http1Transport
from whisperr._transport import Outcome, request_headers
from whisperr._transport import post as transport_post

from .conftest import API_KEY

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def answer(status: int = 202, body: bytes = b'{"ok":true}', headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b" % (
        status,
        len(body),
        headers,
        body,
    )


HANG, DROP, RESET = "hang", "drop", "reset"  # never answer; close, or reset, without answering
DRIP = "drip"  # an answer whose body comes one byte every 20 ms, for ever
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


@attrs.define
class Server:
    """Reads one request at a time and plays the next step of ``script``.

    A step is raw answer bytes, HANG, DROP, RESET or DRIP; ``close_after`` closes the connection
    after answering. Without a script step every request gets ``answer()``.
    """

    script: list[bytes | str] = attrs.field(factory=list)
    close_after: bool = False
    connections: int = 0
    requests: list[h11.Request] = attrs.field(factory=list)
    received: anyio.Event = attrs.field(factory=anyio.Event)
    closed: anyio.Event = attrs.field(factory=anyio.Event)
    url: str = ""

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        async with stream:
            while await self._read_request(stream):
                self.received.set()
                step = self.script.pop(0) if self.script else answer()
                if step == HANG:
                    await anyio.sleep_forever()
                if step == DRIP:
                    await stream.send(b"HTTP/1.1 202 X\r\ncontent-length: 100000\r\n\r\n")
                    while True:
                        await anyio.sleep(0.02)
                        await stream.send(b" ")
                if step == DROP:
                    break
                if step == RESET:  # SO_LINGER 0: the close sends a RST
                    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                assert isinstance(step, bytes)
                await stream.send(step)
                if self.close_after:
                    break
        self.closed.set()

    async def _read_request(self, stream: anyio.abc.ByteStream) -> bool:
        conn = h11.Connection(h11.SERVER)  # one request a connection at a time: no pipelining
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return False
            elif isinstance(event, h11.Request):
                self.requests.append(event)
            elif isinstance(event, h11.EndOfMessage):
                return True


@asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    listener: Any = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if tls is not None:
        listener = TLSListener(listener, tls, standard_compatible=False)
    server.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=Http1Transport(max_idle=4, **kwargs), trust_env=False)


async def post(http: httpx.AsyncClient, url: str, **kwargs: Any) -> httpx.Response:
    return await http.post(url + "/v1/events/batch", content=b'{"events":[]}', **kwargs)


async def test_sequential_requests_share_one_connection() -> None:
    async with serving(Server()) as server, client() as http:
        for _ in range(3):
            response = await post(http, server.url)
            assert (response.status_code, response.json()) == (202, {"ok": True})
    assert server.connections == 1
    assert [r.target for r in server.requests] == [b"/v1/events/batch"] * 3
    assert (b"content-length", b"13") in server.requests[0].headers


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async with serving(Server(close_after=True)) as server, client() as http:
        assert (await post(http, server.url)).status_code == 202
        await server.closed.wait()
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_connection_close_answer_is_not_reused() -> None:
    script: list[bytes | str] = [answer(headers=b"connection: close\r\n"), answer()]
    async with serving(Server(script)) as server, client() as http:
        assert (await post(http, server.url)).status_code == 202
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


@pytest.mark.parametrize(
    ("raw", "content", "connections"),
    [
        (CHUNKED, b"hello world", 1),
        (  # chunk extensions and trailer fields are read past
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3;name=value\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"abc",
            1,
        ),
        (  # framed both ways: read chunked, and the connection is not trusted again
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            b"ok",
            2,
        ),
    ],
)
async def test_chunked_answers_are_read_whole(raw: bytes, content: bytes, connections: int) -> None:
    async with serving(Server([raw])) as server, client() as http:
        assert (await post(http, server.url)).content == content
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == connections


async def test_a_silent_server_is_a_read_timeout() -> None:
    async with serving(Server([HANG])) as server, client() as http:
        with anyio.fail_after(5), pytest.raises(httpx.ReadTimeout):
            # only the read is short: a busy machine may take long to connect
            await post(http, server.url, timeout=httpx.Timeout(5, read=0.05))


async def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:  # bound, never listening: connects are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with client() as http:
            with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
                await post(http, f"http://127.0.0.1:{port}")


async def test_a_cancelled_request_does_not_return_its_connection() -> None:
    async with serving(Server([HANG])) as server, client() as http:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, http, server.url)
            await server.received.wait()
            tg.cancel_scope.cancel()
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_redirects_are_returned_not_followed() -> None:
    redirect = answer(302, b"", b"location: http://127.0.0.1:9/elsewhere\r\n")
    async with serving(Server([redirect])) as server, client() as http:
        response = await post(http, server.url, headers={"X-API-Key": "k"})
    assert response.status_code == 302
    assert len(server.requests) == 1


async def test_an_http_1_0_answer_without_length_runs_to_the_close_and_is_not_reused() -> None:
    script: list[bytes | str] = [b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"]
    async with serving(Server(script, close_after=True)) as server, client() as http:
        assert (await post(http, server.url)).content == b"all of it"
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_informational_answers_are_skipped() -> None:
    script: list[bytes | str] = [b"HTTP/1.1 100 Continue\r\n\r\n" + answer(201, b"{}")]
    async with serving(Server(script)) as server, client() as http:
        response = await post(http, server.url)
    assert (response.status_code, response.content) == (201, b"{}")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (DROP, "closed the connection"),  # no answer at all
        (answer(body=b"x" * (MAX_ANSWER_BYTES + 1)), "larger than"),
        (b"HTTP/2 200 OK\r\n\r\n", "illegal status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nab", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "illegal chunk header"),
        (b"HTTP/1.1 200 OK\r\nx: " + b"a" * (1 << 17), "Receive buffer too long"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "without a pending proposal"),
    ],
)
async def test_a_broken_answer_is_a_protocol_error_and_the_next_request_reconnects(
    raw: bytes | str, message: str
) -> None:
    async with serving(Server([raw])) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await post(http, server.url)
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_a_header_that_would_inject_another_is_refused_before_sending() -> None:
    async with serving(Server()) as server, client() as http:
        with pytest.raises(httpx.LocalProtocolError, match="malformed"):
            await post(http, server.url, headers={"X-Note": "a\r\nX-Injected: 1"})
    assert server.requests == []


async def test_unasked_bytes_after_an_answer_retire_the_connection() -> None:
    script: list[bytes | str] = [answer() + b"HTTP/1.1 200 OK\r\n\r\n"]
    async with serving(Server(script)) as server, client() as http:
        assert (await post(http, server.url)).status_code == 202
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_a_head_answer_has_no_body_whatever_its_length() -> None:
    script: list[bytes | str] = [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]
    async with serving(Server(script)) as server, client() as http:
        with anyio.fail_after(5):
            assert (await http.head(server.url + "/")).content == b""
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 1


async def test_a_content_length_past_the_bound_is_refused_before_its_body() -> None:
    """Thousands of digits (h11 refuses them, without an int overflow) or a 2 MB length."""
    nines = b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n"
    large = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 1)
    async with serving(Server([nines, large])) as server, client() as http:
        with anyio.fail_after(5):
            with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
                await post(http, server.url)
            with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
                await post(http, server.url)
            assert (await post(http, server.url)).status_code == 202
    assert server.connections == 3


async def test_a_compressed_answer_is_handed_on_as_sent_not_inflated() -> None:
    """Decoding is the client's, within its own bound (see test_transport.py)."""
    body = gzip.compress(b"\0" * 2_000_000)  # 2 MB from ~2 kB
    raw = answer(200, body, b"content-encoding: gzip\r\n")
    async with serving(Server([raw])) as server, client() as http:
        request = http.build_request("POST", server.url + "/v1/events/batch", content=b"{}")
        response = await http.send(request, stream=True)
        assert response.headers["content-encoding"] == "gzip"
        assert b"".join([chunk async for chunk in response.aiter_raw()]) == body
        await response.aclose()


async def test_a_connection_idle_past_the_expiry_is_not_reused() -> None:
    now = [0.0]
    async with serving(Server()) as server, client(idle_expiry=5.0, clock=lambda: now[0]) as http:
        assert (await post(http, server.url)).status_code == 202
        now[0] += 4.9
        assert (await post(http, server.url)).status_code == 202
        assert server.connections == 1
        now[0] += 5.0
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


async def test_the_idle_check_works_above_descriptor_1024() -> None:
    """select() cannot watch descriptors past FD_SETSIZE; the check must not fail there."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip("cannot open 1,100 files here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    fillers: list[socket.socket] = []
    try:
        async with serving(Server()) as server, client() as http:
            while not fillers or fillers[-1].fileno() <= 1024:
                fillers.append(socket.socket())
            assert (await post(http, server.url)).status_code == 202  # its descriptor > 1024
            assert (await post(http, server.url)).status_code == 202
        assert server.connections == 1
    finally:
        for filler in fillers:
            filler.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_an_early_answer_to_a_body_the_server_will_not_read(anyio_backend: str) -> None:
    """A server may answer (413) and close before reading a large body.

    Under trio the answer is read after the failed write. Under asyncio anyio's stream is dead
    by then and it is a WriteError (httpx's default transport loses it there too).
    """

    async def handle(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            await stream.send(answer(413, b"too big", b"connection: close\r\n"))

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg, client() as http:
        tg.start_soon(listener.serve, handle)
        url = f"http://127.0.0.1:{port}"
        with anyio.fail_after(10):
            if anyio_backend == "trio":
                response = await http.post(url, content=b"x" * 32_000_000)
                assert response.status_code == 413
            else:
                with pytest.raises(httpx.WriteError):
                    await http.post(url, content=b"x" * 32_000_000)
        tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


async def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with (
        serving(Server(), tls=server_tls(ca)) as server,
        client(ssl_context=lambda: trusted) as http,
    ):
        assert (await post(http, server.url)).status_code == 202
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 1


async def test_https_refuses_a_certificate_it_does_not_trust(ca: trustme.CA) -> None:
    async with serving(Server(), tls=server_tls(ca)) as server, client() as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(http, server.url)
    assert server.requests == []


async def test_bytes_after_an_answer_in_another_tls_record_retire_the_connection(
    ca: trustme.CA,
) -> None:
    """The TLS layer may hold unasked bytes the socket check cannot see; they are not an answer."""
    pad = 16384 - len(answer())
    first = answer(body=b'{"ok":true}' + b" " * pad)
    first = answer(body=b'{"ok":true}' + b" " * (pad - (len(first) - 16384)))
    assert len(first) == 16384  # one full TLS record: what follows is a record of its own
    stale = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE"
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with (
        serving(Server([first + stale]), tls=server_tls(ca)) as server,
        client(ssl_context=lambda: trusted) as http,
    ):
        with anyio.fail_after(5):
            assert (await post(http, server.url)).status_code == 202
            second = await post(http, server.url)
    assert (second.status_code, second.content) == (202, b'{"ok":true}')
    assert server.connections == 2


async def test_tls_answer_to_the_close_without_close_notify(ca: trustme.CA) -> None:
    """Servers often close TLS without close_notify; an answer framed by the close is whole."""
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it"
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with (
        serving(Server([raw], close_after=True), tls=server_tls(ca)) as server,
        client(ssl_context=lambda: trusted) as http,
    ):
        assert (await post(http, server.url)).content == b"all of it"


async def test_the_sdk_sends_its_batches_over_one_kept_alive_connection() -> None:
    key = "wrk_test_secret_key_0123456789"
    async with (
        serving(Server()) as server,
        whisperr.AsyncClient(api_key=key, base_url=server.url) as sdk,
    ):
        for i in range(3):
            sdk.track(f"user_{i}", "payment_failed")
            assert (await sdk.flush(timeout=5)).delivered == 1
    assert server.connections == 1
    assert len(server.requests) == 3
    assert all((b"x-api-key", key.encode()) in r.headers for r in server.requests)
    # an answer's size is bounded on the wire: nothing compressed is asked for
    assert all((b"accept-encoding", b"identity") in r.headers for r in server.requests)


async def test_a_server_closing_during_the_tls_handshake_is_a_counted_connect_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A load balancer with no backend: it takes the ClientHello and closes.

    anyio's EndOfStream used to escape here, logged at ERROR with a traceback (the API key in
    its frames), uncounted. Now it is a ConnectError, retried and reported like any other.
    """

    async def hang_up(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.receive()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    key = "wrk_test_secret_key_0123456789"
    reports: list[whisperr.DeliveryReport] = []
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang_up)
        async with client() as http:
            with pytest.raises(httpx.ConnectError, match=f"localhost:{port}"):
                await post(http, f"https://localhost:{port}")
        sdk = whisperr.AsyncClient(
            api_key=key,
            base_url=f"https://localhost:{port}",
            max_retries=1,
            backoff_base=0.001,
            on_error=reports.append,
        )
        with anyio.fail_after(10), caplog.at_level(logging.DEBUG, logger="whisperr"):
            for i in range(3):
                sdk.track(f"user_{i}", "payment_failed")
            closed = await sdk.aclose(timeout=5)
        tg.cancel_scope.cancel()
    stats = sdk.stats()
    assert (closed.dropped, stats.delivered, stats.retried) == (3, 0, 3)
    assert stats.dropped_by_reason == {"network_error": 3}
    assert [(r.type, r.reason) for r in reports] == [
        ("retry_exhausted", "network_error"),
        ("dropped", "network_error"),
    ]
    assert "ConnectError" in reports[0].message
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert key not in caplog.text


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_kept_alive_connection_dying_before_its_answer_is_replaced_at_once(
    how: str,
) -> None:
    """The server's idle close racing a request: sent again on a new connection, no error.

    A connection that was new is not: its failure is the caller's to retry (see DROP above).
    """
    step: bytes | str = DROP if how == "close" else RESET
    async with serving(Server([answer(), step])) as server, client() as http:
        assert (await post(http, server.url)).status_code == 202
        with anyio.fail_after(5):
            assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2
    assert len(server.requests) == 3  # the second was sent twice


async def test_keep_alive_timeout_shortens_the_idle_expiry() -> None:
    """Keep-Alive: timeout=2 keeps a connection at most 1 s idle (the default expiry is 1.5 s)."""
    now = [0.0]
    script: list[bytes | str] = [answer(headers=b"keep-alive: timeout=2, max=100\r\n")] * 3
    async with (
        serving(Server(script)) as server,
        client(clock=lambda: now[0]) as http,
    ):
        assert (await post(http, server.url)).status_code == 202
        now[0] += 0.9
        assert (await post(http, server.url)).status_code == 202
        assert server.connections == 1
        now[0] += 1.1
        assert (await post(http, server.url)).status_code == 202
    assert server.connections == 2


# -- the client's own path: post() calls the transport itself, no httpx client around it ------


async def direct(
    transport: Http1Transport, url: str, body: bytes = b'{"events":[]}', timeout: float = 5.0
) -> Outcome:
    target = httpx.URL(url + "/v1/events/batch")
    return await transport_post(
        transport, target, request_headers(API_KEY), body, timeout, lambda: 0.0
    )


async def test_the_clients_path_sends_only_its_own_headers() -> None:
    """Host first, the client's headers as built, then Content-Length: nothing httpx's client
    adds (cookies, Accept, Connection), and no redirect machinery around it."""
    async with serving(Server()) as server, Http1Transport(max_idle=4) as transport:
        outcome = await direct(transport, server.url, b'{"events":[1]}')
        assert (await direct(transport, server.url)).kind == "ok"
    assert outcome.kind == "ok"
    assert server.connections == 1  # kept alive between the two
    request = server.requests[0]
    host = server.url.removeprefix("http://").encode()
    assert (request.method, request.target) == (b"POST", b"/v1/events/batch")
    assert [name for name, _ in request.headers] == [
        b"host",
        b"x-api-key",
        b"content-type",
        b"user-agent",
        b"accept-encoding",
        b"content-length",
    ]
    assert dict(request.headers)[b"host"] == host
    assert dict(request.headers)[b"content-length"] == b"14"
    assert dict(request.headers)[b"accept-encoding"] == b"identity"


async def test_the_clients_path_decodes_and_classifies_as_the_httpx_path_does() -> None:
    """A gzipped 202 is read; a 503's Retry-After is honoured; a 302 is not followed; a body
    past the bound is left out while the status still classifies."""
    accepted = gzip.compress(b'{"accepted":3,"rejected":1}')
    chunk = b"x" * 65536
    huge = b"%x\r\n%b\r\n" % (len(chunk), chunk) * (MAX_ANSWER_BYTES // len(chunk) + 1)
    script: list[bytes | str] = [
        answer(202, accepted, b"content-encoding: gzip\r\n"),
        answer(503, b"", b"retry-after: 7\r\n"),
        b"",  # the redirect, to this server (set below)
        b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n" + huge + b"0\r\n\r\n",
    ]
    async with serving(Server(script)) as server:
        script[2] = answer(302, b"", b"location: %b/v1/events/batch\r\n" % server.url.encode())
        async with Http1Transport(max_idle=4) as transport:
            outcomes = [await direct(transport, server.url) for _ in range(3)]
            with anyio.fail_after(5):
                too_large = await direct(transport, server.url)
    assert [(o.kind, o.status) for o in outcomes] == [("ok", 202), ("retry", 503), ("drop", 302)]
    assert outcomes[0].rejected == 1
    assert outcomes[1].retry_after == 7.0
    assert outcomes[2].reason == "redirected"
    assert len(server.requests) == 4  # the redirect (to this server) was not followed
    # past the bound on the wire: a network error, retried, never held whole
    assert (too_large.kind, too_large.reason) == ("retry", "network_error")
    assert "larger than" in too_large.message


async def test_one_deadline_covers_a_slow_drip_on_the_clients_path() -> None:
    """A byte every 20 ms, far within any per-read timeout: the request's one deadline ends it."""
    async with serving(Server([DRIP])) as server, Http1Transport(max_idle=4) as transport:
        with anyio.fail_after(5):
            started = anyio.current_time()
            outcome = await direct(transport, server.url, timeout=0.3)
            elapsed = anyio.current_time() - started
    assert (outcome.kind, outcome.reason) == ("retry", "timeout")
    assert "ReadTimeout" in outcome.message
    assert elapsed == pytest.approx(0.3, abs=0.2)


async def test_the_clients_path_times_out_as_one_deadline_naming_the_phase() -> None:
    async with serving(Server([HANG])) as server, Http1Transport(max_idle=4) as transport:
        with anyio.fail_after(5):
            outcome = await direct(transport, server.url, timeout=0.2)
    assert (outcome.kind, outcome.reason, outcome.connecting) == ("retry", "timeout", False)
    assert "ReadTimeout" in outcome.message
    assert API_KEY not in outcome.message


async def test_a_client_without_a_transport_set_takes_its_own_path() -> None:
    """What reaches the server from a whole client: the headers of :func:`direct`, none of
    those an httpx client adds (``accept``, ``connection``)."""
    async with (
        serving(Server()) as server,
        whisperr.AsyncClient(api_key=API_KEY, base_url=server.url) as sdk,
    ):
        sdk.track("user_8842", "payment_failed", {"amount_cents": 4900})
        await sdk.flush(timeout=5)
        assert sdk.stats().delivered == 1
    names = [name for name, _ in server.requests[0].headers]
    assert (names[0], names[-1]) == (b"host", b"content-length")
    assert not {b"accept", b"connection"} & set(names)
