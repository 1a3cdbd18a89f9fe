"""The one boundary between the client and any transport: `post()` and what it makes of answers.

Every answer is read within bounds (on the wire and decoded), compressed answers are decoded
and then classified as any other, one deadline covers the whole exchange, and no failure of a
transport escapes as an exception.
"""

from __future__ import annotations

import gzip
import logging
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import orjson
import pytest
import trio.testing

import whisperr
from whisperr._transport import MAX_ANSWER_BYTES, Outcome, decode, post, request_headers

from .conftest import API_KEY

pytestmark = pytest.mark.anyio
URL = httpx.URL("https://api.example.com/v1/events/batch")
ACCEPTED = orjson.dumps({"accepted": 3, "rejected": 1})


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def raw_deflate(data: bytes) -> bytes:
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # zlib.compress(wbits=) is 3.11+
    return deflate.compress(data) + deflate.flush()


def decode_error(body: bytes, encoding: str) -> str:
    with pytest.raises(httpx.DecodingError) as info:
        decode(body, [encoding])
    return str(info.value)


def answering(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), trust_env=False)


def streamed(status: int, body: bytes, encoding: str) -> httpx.Response:
    """An answer whose body is still to be read, as real transports hand them on."""
    headers = {"Content-Encoding": encoding}
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


async def send(http: httpx.AsyncClient, timeout: float = 5.0) -> Outcome:
    return await post(http, URL, request_headers(API_KEY), b'{"events":[]}', timeout, lambda: 0.0)


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 says
        ("deflate", lambda data: raw_deflate(data)),  # raw, as IIS sent
        ("gzip, identity", gzip.compress),
        ("deflate, gzip", lambda data: gzip.compress(zlib.compress(data))),
    ],
)
async def test_compressed_answers_are_decoded_then_classified(
    encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    """A server that compresses despite Accept-Encoding: identity still delivers."""
    body = encode(ACCEPTED)
    async with answering(lambda r: streamed(202, body, encoding)) as http:
        outcome = await send(http)
    assert (outcome.kind, outcome.rejected) == ("ok", 1)


async def test_a_gzipped_401_is_an_auth_failure() -> None:
    body = gzip.compress(b'{"error":"invalid api key"}')
    async with answering(lambda r: streamed(401, body, "gzip")) as http:
        outcome = await send(http)
    assert (outcome.kind, outcome.reason, outcome.status) == ("auth", "unauthorized", 401)


async def test_a_compression_bomb_is_refused_within_the_bound() -> None:
    """100 MB of zeros in ~100 kB of gzip: refused having held about the bound, not 100 MB."""
    bomb = gzip.compress(b"\0" * 100_000_000, compresslevel=9)
    async with answering(lambda r: streamed(202, bomb, "gzip")) as http:
        tracemalloc.start()
        try:
            outcome = await send(http)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert (outcome.kind, outcome.answer) == ("ok", b"")  # the status counts; the bomb is left
    assert peak < 4 * MAX_ANSWER_BYTES


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (b"not gzip at all", "gzip", "corrupt gzip"),
        (ACCEPTED, "br", "unsupported Content-Encoding 'br'"),
        (gzip.compress(ACCEPTED)[:-12], "gzip", "truncated gzip"),
    ],
)
async def test_an_answer_that_does_not_decode_is_classified_by_its_status(
    body: bytes, encoding: str, message: str
) -> None:
    """A 202 stored the events whatever its body says (a proxy compressing with brotli): it is
    not sent again; a 401 is an auth failure still."""
    for status, kind in ((202, "ok"), (401, "auth"), (503, "retry")):
        async with answering(lambda r, s=status: streamed(s, body, encoding)) as http:
            outcome = await send(http)
        assert (outcome.kind, outcome.status, outcome.answer) == (kind, status, b"")
    assert message in decode_error(body, encoding)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_endless_answer_from_any_transport_is_cut_at_the_bound() -> None:
    """The bound holds for transports that are not ours (httpx's own reads without one).

    asyncio only: cut short, httpx's own stream wrapper is an async generator left unclosed,
    which trio reports as a ResourceWarning (in httpx, not here).
    """

    class Endless(httpx.AsyncByteStream):
        sent = 0

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                self.sent += 65536
                yield b"x" * 65536

    stream = Endless()
    async with answering(lambda r: httpx.Response(202, stream=stream)) as http:
        outcome = await send(http)
    assert (outcome.kind, outcome.answer) == ("ok", b"")
    assert stream.sent <= MAX_ANSWER_BYTES + 65536


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}))],
)
async def test_one_deadline_covers_a_slow_drip() -> None:
    """Every byte within a per-read timeout, the whole far beyond: one deadline ends it.

    Under trio's mock clock the 10 ms drips take no real time.
    """

    class Drip(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for _ in range(1000):
                await anyio.sleep(0.01)
                yield b" "

    async with answering(lambda r: httpx.Response(202, stream=Drip())) as http:
        started = anyio.current_time()
        outcome = await send(http, timeout=2.0)
        elapsed = anyio.current_time() - started
    assert (outcome.kind, outcome.reason) == ("retry", "timeout")
    assert elapsed == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    "error",
    [
        anyio.EndOfStream(),  # what escaped the old transport from a TLS handshake
        anyio.BrokenResourceError(),
        RuntimeError("a transport's own bug"),
        httpx.ConnectError("no route"),
    ],
)
async def test_no_failure_of_a_transport_escapes(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Each is a retry outcome; nothing is logged with a traceback (its frames hold the key)."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    async with answering(fail) as http:
        with caplog.at_level(logging.DEBUG):
            outcome = await send(http)
    assert (outcome.kind, outcome.reason) == ("retry", "network_error")
    assert type(error).__name__ in outcome.message
    assert outcome.connecting == isinstance(error, httpx.ConnectError)
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_rejection_names_the_url() -> None:
    async with answering(lambda r: httpx.Response(404)) as http:
        outcome = await send(http)
    assert (outcome.kind, outcome.reason) == ("drop", "rejected")
    assert str(URL) in outcome.message
    assert API_KEY not in outcome.message


async def test_a_base_url_path_prefix_is_kept(anyio_backend: str) -> None:
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(202, json={"accepted": 1, "rejected": 0})

    async with whisperr.AsyncClient(
        api_key=API_KEY,
        base_url="https://gw.example.com/whisperr/",
        transport=httpx.MockTransport(record),
    ) as client:
        client.track("user_1", "plan_upgraded")
    assert seen == ["/whisperr/v1/events/batch"]


def first_failure_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is failing" in r.getMessage()]


async def test_the_first_failure_of_a_stretch_is_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three refused connects, a success, a 503: two WARNINGs, the first naming the cause and
    that no proxy was in use; then a connect failure through a proxy says which."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    script: list[Any] = [httpx.ConnectError("[Errno 111] refused")] * 3
    script += [httpx.Response(202, json={"accepted": 1, "rejected": 0}), httpx.Response(503)]

    def answer(request: httpx.Request) -> httpx.Response:
        step = script.pop(0) if script else httpx.Response(202, json={"accepted": 1})
        if isinstance(step, Exception):
            raise step
        return step

    async def no_sleep(delay: float) -> None:
        await anyio.lowlevel.checkpoint()

    options: dict[str, Any] = {"api_key": API_KEY, "sleep": no_sleep, "flush_interval": 60}
    with caplog.at_level(logging.WARNING, logger="whisperr"):
        async with whisperr.AsyncClient(**options, transport=httpx.MockTransport(answer)) as c:
            c.track("user_1", "a_b")
            assert (await c.flush(timeout=5)).delivered == 1
            c.track("user_1", "a_b")
    warnings = first_failure_warnings(caplog)
    assert len(warnings) == 2
    assert "ConnectError" in warnings[0]
    assert "no proxy in use" in warnings[0]
    assert "503" in warnings[1]
    assert "proxy" not in warnings[1]

    caplog.clear()
    # A proxy on 127.0.0.1 that refuses connects (nothing listens on port 9 here).
    client = whisperr.AsyncClient(**options, max_retries=0, proxy="http://user:secret@127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="whisperr"):
        client.track("user_1", "a_b")
        await client.aclose(timeout=5)
    warnings = first_failure_warnings(caplog)
    assert len(warnings) == 1
    assert "through the proxy http://127.0.0.1:9" in warnings[0]
    assert "secret" not in caplog.text
