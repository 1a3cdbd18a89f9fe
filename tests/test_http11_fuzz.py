"""Adversarial and mutated answers against the default transport, under asyncio and trio.

The claim (whisperr/_http11.py): whatever a server sends, the transport returns an answer or
raises an ``httpx`` error (every failure leaves as an ``httpx.TransportError``), promptly and
within bounded memory (heads of :data:`MAX_HEAD_BYTES`, answers of ``MAX_ANSWER_BYTES`` counted
on the wire), and it reads answers as h11 does.

Two kinds of test, over real sockets on 127.0.0.1 (tests/test_http11.py's scripted ``Server``):

- adversarial answers, each with its expected outcome, each within 5 s and with the peak of
  Python allocations (``tracemalloc``, which counts the scripted server too: it sends in 64 kB
  pieces) far below what holding the hostile answer would take: 60 kB of spaces in a head (a
  regex parser froze the event loop 15 s on these), a flood of ``100 Continue``, a body of
  2-byte chunks, conflicting framing, folded and bare-LF lines, a head cut short or endless;
- a seeded fuzz: valid answers (Content-Length, chunked with extensions and trailers,
  close-delimited, 1xx first) with random byte and line mutations, each sent by a server that
  then closes. The transport must answer or raise an ``httpx.HTTPError``, nothing else, within
  2 s; and it must agree with h11 itself, fed the same bytes and the end of the stream after
  the same request: where h11 reads a whole answer, the transport returns the same status,
  headers and body; where h11 fails, the transport raises.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
import attrs
import h11
import httpx
import pytest

from whisperr._http11 import MAX_HEAD_BYTES

from .test_http11 import Server, answer, client, post, serving

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


STATUS = b"HTTP/1.1 200 OK\r\n"
OK = b"content-length: 2\r\n\r\nok"
CHUNKED_HEAD = STATUS + b"transfer-encoding: chunked\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SPACES = b" " * 60_000
PIECE = 65536
# Peak bytes allocated during one exchange: an answer is at most 1 MiB, and a 2-byte-chunk
# answer is 3.5 MB on the wire (the old regex parser took +40 MB on it).
MEMORY_BOUND = 4 * 1024 * 1024


@attrs.define
class Adversary(Server):
    """Reads one request as ``Server`` does, sends ``feed()`` piece by piece (``delay`` apart),
    then closes the connection, or with ``hang`` keeps it open and silent. A client that leaves
    mid-answer ends the feed."""

    feed: Callable[[], Iterable[bytes]] = attrs.field(kw_only=True)
    delay: float = 0.0
    hang: bool = False

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async with stream:
                if await self._read_request(stream):
                    for piece in self.feed():
                        await stream.send(piece)
                        await anyio.sleep(self.delay)  # a drip: the scenario
                    if self.hang:
                        await anyio.sleep_forever()


def pieces(data: bytes) -> Callable[[], Iterator[bytes]]:
    """``data`` in 64 kB pieces."""
    return lambda: (data[i : i + PIECE] for i in range(0, len(data), PIECE))


def repeated(
    head: bytes, unit: bytes, count: int | None, tail: bytes
) -> Callable[[], Iterator[bytes]]:
    """``head``, ``unit`` ``count`` times (for ever with None), ``tail``: made as it is sent."""

    def feed() -> Iterator[bytes]:
        yield head
        per_piece, left = max(1, PIECE // len(unit)), count
        while left is None or left > 0:
            n = per_piece if left is None else min(per_piece, left)
            yield unit * n
            if left is not None:
                left -= n
        yield tail

    return feed


def drip(head: bytes, unit: bytes) -> Callable[[], Iterator[bytes]]:
    """``head``, then ``unit`` for ever, one piece each."""
    return lambda: itertools.chain([head], itertools.repeat(unit))


@attrs.frozen
class Answer:
    status: int
    content: bytes
    headers: dict[str, str] = attrs.field(factory=dict)  # some of the headers it must have


@attrs.frozen
class Refusal:
    error: type[httpx.HTTPError]
    match: str


@attrs.frozen
class Case:
    id: str
    feed: Callable[[], Iterable[bytes]]
    expect: Answer | Refusal
    delay: float = 0.0
    hang: bool = False
    read_timeout: float | None = None  # the transport's deadline; None: just within the test's


def protocol_error(match: str) -> Refusal:
    return Refusal(httpx.RemoteProtocolError, match)


CASES = [
    Case(
        "a 60 kB line of spaces",
        pieces(STATUS + SPACES + b"\r\n" + OK),
        protocol_error("continuation line at start of headers"),
    ),
    Case(
        "a 60 kB line of spaces then NUL",
        pieces(STATUS + SPACES + b"\0\r\n\r\n"),
        protocol_error("continuation line at start of headers"),
    ),
    Case(
        "a value of 60 kB of spaces between two letters",
        pieces(STATUS + b"x: a" + SPACES + b"b\r\n" + OK),
        Answer(200, b"ok", {"x": "a" + " " * 60_000 + "b"}),
    ),
    Case(
        "a folded line of 60 kB of spaces",
        pieces(STATUS + b"x: a\r\n" + SPACES + b"\r\n" + OK),
        Answer(200, b"ok", {"x": "a"}),
    ),
    Case(
        "10,000 100 Continue first",
        repeated(b"", CONTINUE, 10_000, answer(201, b'{"accepted":1}')),
        Answer(201, b'{"accepted":1}'),
    ),
    Case(  # 1.25 MB of them: past the bound on the wire
        "50,000 100 Continue first",
        repeated(b"", CONTINUE, 50_000, answer(201, b'{"accepted":1}')),
        protocol_error("larger than"),
    ),
    Case(  # 3.5 MB on the wire
        "a 1 MiB body in 2-byte chunks",
        repeated(CHUNKED_HEAD, b"2\r\nab\r\n", 1 << 19, b"0\r\n\r\n"),
        protocol_error("larger than"),
    ),
    Case(  # 0.45 MB on the wire: within the bound
        "a 128 KiB body in 2-byte chunks",
        repeated(CHUNKED_HEAD, b"2\r\nab\r\n", 1 << 16, b"0\r\n\r\n"),
        Answer(200, b"ab" * (1 << 16)),
    ),
    Case(
        "two different Content-Length",
        pieces(STATUS + b"content-length: 2\r\ncontent-length: 3\r\n\r\nok"),
        protocol_error("conflicting Content-Length"),
    ),
    Case(
        "Content-Length and chunked",
        pieces(
            STATUS + b"content-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        ),
        Answer(200, b"ok"),
    ),
    Case(
        "Transfer-Encoding: gzip, chunked",
        pieces(STATUS + b"transfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        protocol_error("Only Transfer-Encoding: chunked"),
    ),
    Case(
        "obs-fold continuation lines",
        pieces(STATUS + b"x: a\r\n  b\r\n\tc\r\n" + OK),
        Answer(200, b"ok", {"x": "a b c"}),
    ),
    Case(
        "bare-LF line endings",
        pieces(b"HTTP/1.1 200 OK\nx: 1\ncontent-length: 2\n\nok"),
        Answer(200, b"ok", {"x": "1"}),
    ),
    Case(
        "mixed LF and CRLF line endings",
        pieces(b"HTTP/1.1 200 OK\r\nx: 1\ncontent-length: 2\r\n\nok"),
        Answer(200, b"ok", {"x": "1"}),
    ),
    Case(  # h11 reads chunk lines only with CRLF: it waits for one, then meets the close
        "bare-LF chunk lines",
        pieces(b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n2\nok\n0\n\n"),
        protocol_error("peer unexpectedly closed"),
    ),
    Case(
        "a status line only, then the close",
        pieces(STATUS),
        protocol_error("peer unexpectedly closed"),
    ),
    Case(
        "a status line only, then silence",
        pieces(STATUS),
        Refusal(httpx.ReadTimeout, "timed out"),
        hang=True,
        read_timeout=0.5,
    ),
    Case(
        "a head that never ends",
        repeated(STATUS, b"x-filler: " + b"a" * 50 + b"\r\n", None, b""),
        protocol_error("Receive buffer too long"),
    ),
    Case(
        "a header line that never ends",
        repeated(STATUS + b"x: ", b"a", None, b""),
        protocol_error("Receive buffer too long"),
    ),
    Case(  # a drip within any per-read timeout: only a deadline for the whole exchange ends it
        "a head dripping for ever",
        drip(STATUS, b"x: a\r\n"),
        Refusal(httpx.ReadTimeout, "timed out"),
        delay=0.02,
        read_timeout=0.5,
    ),
]


async def exchange(case: Case, seconds: float) -> tuple[httpx.Response | httpx.HTTPError, float]:
    """One request to a fresh adversary: the answer or the httpx error, and how long it took."""
    server = Adversary(feed=case.feed, delay=case.delay, hang=case.hang)
    timeout = httpx.Timeout(5, read=case.read_timeout or seconds - 0.5)
    async with serving(server) as scripted, client() as http:
        started = time.monotonic()
        try:
            with anyio.fail_after(seconds):
                return await post(http, scripted.url, timeout=timeout), time.monotonic() - started
        except httpx.HTTPError as exc:
            return exc, time.monotonic() - started


def check(case: Case, outcome: httpx.Response | httpx.HTTPError) -> None:
    expect = case.expect
    if isinstance(expect, Answer):
        assert isinstance(outcome, httpx.Response), repr(outcome)
        assert (outcome.status_code, outcome.content) == (expect.status, expect.content)
        assert {name: outcome.headers.get(name) for name in expect.headers} == expect.headers
    else:
        assert isinstance(outcome, expect.error), repr(outcome)
        assert expect.match in str(outcome)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_an_adversarial_answer_is_read_or_refused_in_bounded_time_and_memory(
    case: Case,
) -> None:
    """The expected answer or httpx error within 5 s (a timeout within the read timeout and a
    second); then the same once more under tracemalloc (about 3 times slower), for the peak of
    what was allocated meanwhile."""
    outcome, elapsed = await exchange(case, 5)
    check(case, outcome)
    if case.read_timeout is not None:  # one deadline for the whole exchange
        assert elapsed < case.read_timeout + 1.0
    tracemalloc.start()
    try:
        outcome, _ = await exchange(case, 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    check(case, outcome)
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.1f} MiB at the peak"


# -- the seeded fuzz and its differential against h11 -------------------------------------------

SEED = 20260614
MUTANTS = 1000
BODY = b'{"events":[]}'
VALID = [
    answer(202, b'{"accepted":1,"rejected":0}', b"keep-alive: timeout=5\r\n"),
    CHUNKED_HEAD + b"5;a=b\r\nhello\r\n6;ext\r\n world\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it, to the close",
    b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it",
    CONTINUE + b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(201, b"{}"),
    answer(503, b'{"error":{}}', b"retry-after: 1\r\nconnection: close\r\n"),
    b"HTTP/1.1 204 No Content\r\nx-request-id: abc\r\n\r\n",
]
TOKENS = [
    *(bytes([b]) for b in b"\r\n \t:;,\x00\x7f\xff09aZ-/."),
    b"\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 ",
    b"content-length: 5\r\n",
    b"transfer-encoding: chunked\r\n",
    b"0\r\n\r\n",
    b"ffffffff\r\n",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation: a bit flipped, a token put in or over, bytes or lines cut or doubled."""
    buffer = bytearray(data)
    at = rng.randrange(len(buffer) + 1)
    kind = rng.randrange(8)
    if kind == 0 and buffer:
        buffer[min(at, len(buffer) - 1)] ^= 1 << rng.randrange(8)
    elif kind == 1:
        buffer[at:at] = rng.choice(TOKENS)
    elif kind == 2:
        token = rng.choice(TOKENS)
        buffer[at : at + len(token)] = token
    elif kind == 3:
        del buffer[at : at + rng.randint(1, 8)]
    elif kind == 4:
        del buffer[at:]
    else:
        lines = data.split(b"\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        if kind == 5:
            lines.insert(i, lines[i])  # a line twice
        elif kind == 6:
            del lines[i]
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines)
    return bytes(buffer)


def mutants() -> list[bytes]:
    rng = random.Random(SEED)
    made = []
    for _ in range(MUTANTS):
        data = rng.choice(VALID)
        for _ in range(rng.randint(1, 3)):
            data = mutate(rng, data)
        made.append(data)
    return made


Read = tuple[int, list[tuple[bytes, bytes]], bytes]


def h11_reads(raw: bytes, request: httpx.Request) -> Read | None:
    """What h11 itself reads from ``raw`` then the end of the stream, after ``request``: the
    status, headers and body of a whole answer, or None if it finds none."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    target = request.url.raw_path
    conn.send(h11.Request(method=request.method, target=target, headers=request.headers.raw))
    conn.send(h11.Data(data=request.content))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, headers, content = 0, [], bytearray()
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(content)
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.ProtocolError:
        return None


async def transport_reads(raw: bytes) -> tuple[httpx.Request, Read | BaseException]:
    """Serve ``raw``, then close, to one request: what the transport made of it, as the SDK
    reads an answer (``_transport.post``: streamed, the body as sent)."""
    async with serving(Server([raw], close_after=True)) as scripted, client() as http:
        request = http.build_request(
            "POST",
            scripted.url + "/v1/events/batch",
            content=BODY,
            timeout=httpx.Timeout(5, read=2),
        )
        try:
            with anyio.fail_after(2):
                response = await http.send(request, stream=True)
                content = b"".join([chunk async for chunk in response.aiter_raw()])
                await response.aclose()
        except Exception as exc:  # judged by the caller: only httpx errors are allowed
            return request, exc
    headers = [(name.lower(), value) for name, value in response.headers.raw]
    return request, (response.status_code, headers, content)


async def test_mutated_answers_are_read_as_h11_reads_them_or_refused_with_an_httpx_error() -> None:
    """Each of the seeded mutants: an answer equal to h11's reading, or an httpx error where
    h11 reads none; never another exception, never more than 2 s."""
    found: dict[str, int] = {"read": 0, "refused": 0}
    wrong: list[str] = []
    for index, raw in enumerate(mutants()):
        request, got = await transport_reads(raw)
        expected = h11_reads(raw, request)
        what: Any = type(got).__name__ if isinstance(got, BaseException) else got[0]
        if isinstance(got, BaseException) and not isinstance(got, httpx.HTTPError):
            wrong.append(f"#{index} {raw!r:.300}: raised {got!r}")
        elif expected is None and not isinstance(got, BaseException):
            wrong.append(f"#{index} {raw!r:.300}: h11 finds no answer, the transport read {what}")
        elif expected is not None and got != expected:
            wrong.append(f"#{index} {raw!r:.300}: h11 reads {expected!r:.200}, transport {got!r}")
        found["refused" if expected is None else "read"] += 1
    assert wrong == [], "\n".join(wrong[:20])
    # the mutations reach both sides of the parser, not just one
    assert min(found.values()) > MUTANTS // 10, found
