"""Servers that close idle connections, for real: stale connections are not failures.

The claim (whisperr/_http11.py): a request whose reused connection dies before any answer
byte is sent again at once on a new connection, without a backoff sleep and without counting
as a retry; a connection is kept idle at most ``IDLE_EXPIRY`` (1.5 s), below the common server
defaults (gunicorn 2 s), and at most N/2 s after a ``Keep-Alive: timeout=N`` answer.

The servers are real and run as subprocesses on 127.0.0.1: uvicorn with
``--timeout-keep-alive 1``, and gunicorn's gthread worker with ``--keep-alive 2`` (its
default). Both serve the bundled ingestion app (``whisperr.server.create_app``) through a small
module written to the test's tmp_path (:data:`APP`): for uvicorn the ASGI app itself, for
gunicorn (WSGI only in its gthread worker) the same app behind a few lines of WSGI-to-ASGI
bridge. The module logs, server-side, each ingestion request's client port and status, and
answers ``GET /_test/log`` with that log and the ids the app stored. So what was stored, and
on which connection each request came, is the server's word, not the SDK's.

The client sends one event, flushes, waits an idle time near the server's timeout (the waits
are the scenario), and repeats. Its ``sleep`` records every call: the SDK uses it only for
backoff, so an empty record means no request was retried after a backoff.

Two scripted-server tests (tests/test_http11.py's ``Server``) make the race deterministic: the
server reads the request on a reused connection and hangs up (FIN, or a reset) before answering.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
import attrs
import httpx
import orjson
import pytest

import whisperr
from whisperr._http11 import IDLE_EXPIRY

from .conftest import API_KEY, Sleeps
from .test_http11 import DROP, RESET, Server, answer, serving
from .test_lifecycle import stop
from .test_network import free_port

pytestmark = pytest.mark.anyio

START_TIMEOUT = 20.0  # for a server process to answer its first request
# The most one flush may take: one event, one request on loopback (about a millisecond; two
# when a stale connection is replaced). A request that hung until its timeout (10 s here) or a
# real backoff would blow it; the slack is for a loaded machine.
FLUSH_BOUND = 1.0
# An idle time this far below the server's timeout (and the client's expiry) is "surely" kept:
# the request must come on the previous request's connection.
REUSE_MARGIN = 0.3

APP = '''
"""The bundled ingestion app, logging each request's client port and answer status."""
import asyncio
import os

import orjson

from whisperr.server import create_app

inner = create_app(api_key=os.environ["IDLE_API_KEY"])
KEEP_ALIVE = os.environ.get("IDLE_KEEP_ALIVE", "").encode()
log = []  # [path, client port, status] of each request answered, in answer order


async def app(scope, receive, send):
    if scope["type"] != "http":
        return await inner(scope, receive, send)
    if scope["path"] == "/_test/log":
        stored = [event["context"]["$message_id"] for event in inner.events]
        body = orjson.dumps({"requests": log, "stored": stored})
        length = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": length})
        return await send({"type": "http.response.body", "body": body})

    async def logging_send(message):
        if message["type"] == "http.response.start":
            log.append([scope["path"], scope["client"][1], message["status"]])
            if KEEP_ALIVE:
                headers = [*message["headers"], (b"keep-alive", KEEP_ALIVE)]
                message = {**message, "headers": headers}
        await send(message)

    await inner(scope, receive, logging_send)


def wsgi(environ, start_response):
    """The same app for a WSGI server: one whole request in, one whole answer out."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    names = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}
    names |= {k: k[5:].replace("_", "-").lower() for k in environ if k.startswith("HTTP_")}
    headers = [(n.encode(), environ[k].encode("latin-1")) for k, n in names.items() if k in environ]
    client = (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"]))
    scope = {"type": "http", "method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
             "headers": headers, "client": client}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, *parts = sent
    start_response(f"{start['status']} -", [(k.decode(), v.decode()) for k, v in start["headers"]])
    return [part.get("body", b"") for part in parts]
'''


@attrs.frozen
class Logged:
    """One request as the server answered it."""

    path: str
    port: int  # the client's port: the same port, the same connection
    status: int


@attrs.frozen
class RealServer:
    url: str
    process: subprocess.Popen[bytes]
    output: Path

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]

    async def log(self) -> tuple[list[Logged], list[str]]:
        """The ingestion requests the server answered, and the ids it stored, in order."""
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            response = await http.get(self.url + "/_test/log")
        assert response.status_code == 200, self.tail()
        data = orjson.loads(response.content)
        logged = [Logged(path, port, status) for path, port, status in data["requests"]]
        return logged, data["stored"]


@contextlib.contextmanager
def running(kind: str, tmp_path: Path, keep_alive_header: str = "") -> Iterator[RealServer]:
    """Start ``kind`` ("uvicorn" or "gunicorn") on a free 127.0.0.1 port; always stop it."""
    (tmp_path / "idle_app.py").write_text(APP, encoding="utf-8")
    port = free_port()
    bind = ["127.0.0.1", str(port)]
    if kind == "uvicorn":
        command = ["-m", "uvicorn", "idle_app:app", "--host", bind[0], "--port", bind[1]]
        command += ["--timeout-keep-alive", "1", "--no-access-log", "--app-dir", str(tmp_path)]
    else:
        command = ["-m", "gunicorn", "idle_app:wsgi", "--bind", ":".join(bind), "--workers", "1"]
        command += ["-k", "gthread", "--threads", "2", "--keep-alive", "2"]
        command += ["--chdir", str(tmp_path), *_gunicorn_without_control_socket()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    env |= {"IDLE_API_KEY": API_KEY, "IDLE_KEEP_ALIVE": keep_alive_header}
    env |= {"PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    output = tmp_path / f"{kind}.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, *command],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = RealServer(f"http://127.0.0.1:{port}", process, output)
    try:
        _wait_until_answering(server)
        yield server
    finally:
        stop(process)


def _gunicorn_without_control_socket() -> list[str]:
    """Recent gunicorn (27 here) opens a control socket under ~/.gunicorn unless told not to."""
    from gunicorn.config import Config  # type: ignore[import-untyped]

    return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []


def _wait_until_answering(server: RealServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            if httpx.get(server.url + "/_test/log", timeout=1, trust_env=False).is_success:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a subprocess's readiness, bounded by the deadline
    pytest.fail(f"the server did not start (exit {server.process.poll()}):\n{server.tail()}")


@attrs.frozen
class Trickle:
    """What the client saw of one run: its ids, each flush's result and duration, its stats."""

    ids: list[str]
    results: list[whisperr.FlushResult]
    durations: list[float]
    stats: whisperr.Stats


async def trickle(url: str, waits: Sequence[float], sleeps: Sleeps) -> Trickle:
    """One event and a flush, then for each wait: idle that long, one event and a flush."""
    ids, results, durations = [], [], []
    async with whisperr.AsyncClient(
        api_key=API_KEY,
        base_url=url,
        sleep=sleeps,
        flush_interval=60.0,  # a batch goes out on flush(), not on a timer of its own
        request_timeout=10.0,
        trust_env=False,  # the default transport, whatever proxy the environment names
    ) as client:
        for index, wait in enumerate([0.0, *waits]):
            await anyio.sleep(wait)  # the idle time: the scenario, not a wait for a result
            ids.append(client.track("user_1", "payment_failed", {"round": index}))
            started = time.monotonic()
            results.append(await client.flush(timeout=5))
            durations.append(time.monotonic() - started)
        stats = client.stats()
    return Trickle(ids, results, durations, stats)


async def assert_each_event_stored_once_without_retry(
    server: RealServer, run: Trickle, sleeps: Sleeps
) -> list[bool]:
    """The common verdict; returns, for each wait, whether its request reused a connection."""
    logged, stored = await server.log()
    rounds = len(run.ids)
    assert [(r.delivered, r.dropped, r.timed_out) for r in run.results] == [(1, 0, False)] * rounds
    assert (run.stats.tracked, run.stats.delivered, run.stats.dropped) == (rounds, rounds, 0)
    assert run.stats.retried == 0, run.stats.last_error
    assert sleeps.delays == [], "a request was retried after a backoff"
    assert max(run.durations) < FLUSH_BOUND, run.durations
    # Stored once each, in order; and each sent once as far as the server saw: a request it
    # reads it answers, so a duplicate delivery would show as one more answered request.
    assert stored == run.ids
    assert [(r.path, r.status) for r in logged] == [("/v1/events/batch", 202)] * rounds
    ports = [r.port for r in logged]
    return [after == before for before, after in itertools.pairwise(ports)]


def reuses(
    waits: Sequence[float], reused: list[bool], chosen: Callable[[float], bool]
) -> list[bool]:
    """For each wait ``chosen`` picks, whether the request after it reused the connection."""
    return [kept for wait, kept in zip(waits, reused, strict=True) if chosen(wait)]


async def test_uvicorn_closing_idle_connections_after_1s(tmp_path: Path, sleeps: Sleeps) -> None:
    """uvicorn closes a connection idle for 1 s; requests after 0.5 to 1.2 s idle all land once.

    Around 1 s the server's close races the request (a FIN seen before sending, or the request
    sent into a connection being closed: the stale case); either way no retry and no backoff.
    """
    waits = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0, 1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3]
    with running("uvicorn", tmp_path) as server:
        run = await trickle(server.url, waits, sleeps)
        reused = await assert_each_event_stored_once_without_retry(server, run, sleeps)
    # the scenario happened: a trickle below the timeout kept its connection, and past it the
    # server had closed it
    # A short idle reuses the connection (one of two is enough: a stalled machine may idle
    # longer than it waited); a long one never does, whatever the load (idle >= wait).
    assert any(reuses(waits, reused, lambda wait: wait <= 1.0 - REUSE_MARGIN))
    assert reuses(waits, reused, lambda wait: wait >= 1.0 + 0.15) == [False] * 2


async def test_the_client_retires_idle_connections_before_gunicorns_2s_keep_alive(
    tmp_path: Path, sleeps: Sleeps
) -> None:
    """gunicorn (gthread) keeps an idle connection 2 s; the client drops it at 1.5 s first.

    A connection idle ``IDLE_EXPIRY`` or longer is never reused (strict: the idle time is at
    least the wait), so no request meets gunicorn's close; shorter idles reuse the connection.
    """
    assert IDLE_EXPIRY < 2.0  # the claim: below gunicorn's default
    waits = [1.1, 1.4, 1.45, 1.5, 1.6, 1.8, 1.95, 2.0, 2.05, 2.2]
    with running("gunicorn", tmp_path) as server:
        run = await trickle(server.url, waits, sleeps)
        reused = await assert_each_event_stored_once_without_retry(server, run, sleeps)
    assert any(reuses(waits, reused, lambda wait: wait <= IDLE_EXPIRY - REUSE_MARGIN))
    assert reuses(waits, reused, lambda wait: wait >= IDLE_EXPIRY) == [False] * 7


async def test_a_keep_alive_timeout_answer_halves_how_long_a_connection_is_kept(
    tmp_path: Path, sleeps: Sleeps
) -> None:
    """Answers carry ``Keep-Alive: timeout=1``: a connection idle over 0.5 s is not reused.

    uvicorn here closes at 1 s and the client's own expiry is 1.5 s, so below 1 s only the
    header makes the client take a new connection (without it, test_uvicorn_... above reuses
    the connection after 0.5 and 0.7 s).
    """
    waits = [0.2, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.1]
    with running("uvicorn", tmp_path, keep_alive_header="timeout=1") as server:
        run = await trickle(server.url, waits, sleeps)
        reused = await assert_each_event_stored_once_without_retry(server, run, sleeps)
    assert reused[1:-1] == [False] * 6  # strict: each idled at least its wait, over 0.5 s
    assert reused[0] or reused[-1]  # a short idle (0.2 s, 0.1 s) keeps it


# -- the race made deterministic: a scripted server hangs up on a reused connection -------------
# (tests/test_http11.py checks the transport's part; these check the SDK's: no retry counted, no
# backoff sleep)


def sdk(url: str, sleeps: Sleeps) -> whisperr.AsyncClient:
    return whisperr.AsyncClient(
        api_key=API_KEY, base_url=url, sleep=sleeps, flush_interval=60.0, trust_env=False
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("hang_up", [DROP, RESET], ids=["fin", "reset"])
async def test_a_reused_connection_that_dies_before_its_answer_is_replaced_at_once(
    hang_up: str, sleeps: Sleeps
) -> None:
    """The second request goes on the kept connection; the server reads it and hangs up.

    It is sent again at once on a new connection: delivered, no retry counted, no backoff.
    """
    script: list[bytes | str] = [answer(), hang_up]
    async with serving(Server(script)) as scripted, sdk(scripted.url, sleeps) as client:
        for user in ("user_1", "user_2"):
            client.track(user, "payment_failed")
            with anyio.fail_after(5):
                assert (await client.flush(timeout=5)).delivered == 1
        stats = client.stats()
    assert (stats.delivered, stats.retried, stats.dropped) == (2, 0, 0)
    assert sleeps.delays == []
    assert scripted.connections == 2
    assert len(scripted.requests) == 3  # the one the server hung up on, and it again


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("hang_up", [DROP, RESET], ids=["fin", "reset"])
async def test_the_same_hang_up_on_a_new_connection_is_a_retry_after_a_backoff(
    hang_up: str, sleeps: Sleeps
) -> None:
    """The contrast: a fresh connection that dies is a failure, retried after a backoff sleep
    (so the two counters the idle-close tests read do see a retry when there is one)."""
    async with serving(Server([hang_up])) as scripted, sdk(scripted.url, sleeps) as client:
        client.track("user_1", "payment_failed")
        with anyio.fail_after(5):
            assert (await client.flush(timeout=5)).delivered == 1
        stats = client.stats()
    assert (stats.delivered, stats.retried, stats.dropped) == (1, 1, 0)
    assert len(sleeps.delays) == 1
    assert (scripted.connections, len(scripted.requests)) == (2, 2)
