"""The examples, run for real against the bundled local server on 127.0.0.1.

The web apps are served by their real servers (uvicorn, aiohttp's runner) and called over HTTP;
the scripts run as subprocesses. Each test then checks that every tracked event reached the
local server exactly once, with the type and properties it was tracked with.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from aiohttp import web

import whisperr
from whisperr.server import Fault, LocalServer, create_app

from .conftest import API_KEY

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT_TIMEOUT = 60.0
START_TIMEOUT = 10.0

Signal = tuple[str, str, dict[str, Any]]  # (external_user_id, event_type, properties)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WHISPERR_* variable of the developer's shell leaks into a test or its subprocesses."""
    for name in list(os.environ):
        if name.startswith("WHISPERR_"):
            monkeypatch.delenv(name)


@pytest.fixture
def server(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """The local server, and the WHISPERR_* variables that point the examples at it."""
    with LocalServer(create_app(api_key=API_KEY)) as running:
        monkeypatch.setenv("WHISPERR_API_KEY", API_KEY)
        monkeypatch.setenv("WHISPERR_BASE_URL", running.url)
        yield running


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"whisperr_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *args: str) -> str:
    """Run examples/<name>.py with warnings as errors; return its stdout once it exits 0."""
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no warning, no delivery problem logged
    return done.stdout


def stored_once(server: LocalServer) -> dict[str, Signal]:
    """The stored events by $message_id, after checking that none was sent twice or refused.

    The server keeps one copy per $message_id, so a duplicate would not show in its store; it
    shows as more events on the wire than stored.
    """
    batches = [r for r in server.app.requests if r.path == "/v1/events/batch"]
    assert {r.status for r in batches} <= {202}
    stored = server.app.events
    assert sum(r.events for r in batches) == len(stored)
    return {
        e["context"]["$message_id"]: (e["external_user_id"], e["event_type"], e["properties"])
        for e in stored
    }


@contextlib.contextmanager
def uvicorn_serving(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yield its URL.

    On exit uvicorn stops, running the app's lifespan shutdown, before this returns.
    """
    # IPPROTO_TCP so that asyncio sets TCP_NODELAY on the accepted connections.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:  # a bounded poll for readiness
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


# -- FastAPI ---------------------------------------------------------------------------------


def test_fastapi_app_async_and_sync_routes(server: LocalServer) -> None:
    """200 concurrent requests over both routes: each event stored once, delivered by shutdown."""
    app = load_example("fastapi_app").create_app()

    def call(http: httpx.Client, i: int) -> tuple[str, Signal]:
        user = f"user_{i % 7}"
        if i % 2:  # the async def route
            response = http.post(f"/users/{user}/payment-failed", json={"amount_cents": i})
            signal = (user, "payment_failed", {"amount_cents": i, "decline_code": "card_declined"})
        else:  # the plain def route, run in FastAPI's thread pool
            response = http.post(f"/users/{user}/cancel", params={"reason": f"reason_{i}"})
            signal = (user, "subscription_cancelled", {"reason": f"reason_{i}"})
        assert response.status_code == 202, response.text
        return response.json()["message_id"], signal

    with (
        uvicorn_serving(app) as url,
        httpx.Client(base_url=url, trust_env=False, timeout=10) as http,
        ThreadPoolExecutor(8) as pool,
    ):
        sent = dict(pool.map(lambda i: call(http, i), range(200)))

    # uvicorn has stopped, so the lifespan has closed the client: everything is delivered.
    assert len(sent) == 200
    assert stored_once(server) == sent
    stats = app.state.whisperr.stats()
    assert (stats.tracked, stats.delivered, stats.dropped, stats.queued) == (200, 200, 0, 0)


def test_fastapi_sync_route_delivers_while_running(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event tracked from the thread pool ships within the flush interval, not at shutdown."""
    monkeypatch.setenv("WHISPERR_FLUSH_INTERVAL", "0.05")
    app = load_example("fastapi_app").create_app()
    with (
        uvicorn_serving(app) as url,
        httpx.Client(base_url=url, trust_env=False, timeout=10) as http,
    ):
        response = http.post("/users/user_1/cancel")
        assert response.status_code == 202
        deadline = time.monotonic() + 5.0
        while not server.app.events:  # a bounded poll, while the service still runs
            assert time.monotonic() < deadline, "the event was not delivered while running"
            time.sleep(0.01)
    assert stored_once(server) == {
        response.json()["message_id"]: (
            "user_1",
            "subscription_cancelled",
            {"reason": "too_expensive"},
        )
    }


# -- aiohttp ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def aiohttp_serving(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app with its runner on a free 127.0.0.1 port; yield its URL.

    On exit the runner stops and cleans up (cleanup_ctx, on_cleanup) before this returns.
    """
    runner = web.AppRunner(app)
    await runner.setup()  # runs the startup and the cleanup_ctx up to their yield
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        with anyio.fail_after(30):
            await runner.cleanup()


@pytest.mark.anyio
async def test_aiohttp_app(server: LocalServer) -> None:
    """100 concurrent requests through aiohttp's runner; cleanup delivers them all once."""
    module = load_example("aiohttp_app")
    app = module.create_app()
    sent: dict[str, Signal] = {}

    async def call(http: httpx.AsyncClient, i: int) -> None:
        user, feature = f"user_{i % 5}", f"feature_{i}"
        response = await http.post(f"/users/{user}/feature-used", json={"feature": feature})
        assert response.status_code == 202, response.text
        sent[response.json()["message_id"]] = (user, "feature_used", {"feature": feature})

    # Leaving aiohttp_serving runs the rest of the cleanup_ctx: the client closes and delivers.
    async with aiohttp_serving(app) as url:
        with anyio.fail_after(30):
            async with (
                httpx.AsyncClient(base_url=url, trust_env=False) as http,
                anyio.create_task_group() as tg,
            ):
                for i in range(100):
                    tg.start_soon(call, http, i)

    assert len(sent) == 100
    assert stored_once(server) == sent
    stats = app[module.WHISPERR].stats()
    assert (stats.tracked, stats.delivered, stats.dropped, stats.queued) == (100, 100, 0, 0)


# -- the current request's user: whisperr.asgi, whisperr.aiohttp -----------------------------


def test_fastapi_current_user(server: LocalServer) -> None:
    """Events tracked with no user id passed, each stored once for the signed-in user of its
    request, the background task's too; a visitor's is counted; shutdown delivered them all."""
    module = load_example("fastapi_current_user")
    app = module.create_app()
    tokens = sorted(module.TOKENS)

    def call(http: httpx.Client, i: int) -> tuple[str, Signal]:
        token, body = tokens[i % len(tokens)], {"format": f"format_{i}"}
        response = http.post("/exports", json=body, headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 202, response.text
        return response.json()["message_id"], (module.TOKENS[token], "export_requested", body)

    with (
        uvicorn_serving(app) as url,
        httpx.Client(base_url=url, trust_env=False, timeout=10) as http,
        ThreadPoolExecutor(8) as pool,
    ):
        sent = dict(pool.map(lambda i: call(http, i), range(40)))
        assert http.post("/exports", json={}).status_code == 401
        assert http.get("/pricing").json() == {"message_id": None}  # nobody signed in
        viewed = http.get("/pricing", headers={"authorization": "Bearer tok_lin"}).json()

    stored = stored_once(server)
    assert {message_id: stored[message_id] for message_id in sent} == sent
    assert stored[viewed["message_id"]] == ("user_1203", "pricing_viewed", {})
    ready = [(user, "export_ready", body) for user, _, body in sent.values()]
    later = [s for s in stored.values() if s[1] == "export_ready"]
    assert sorted(later, key=repr) == sorted(ready, key=repr)
    assert len(stored) == 81
    stats = app.state.whisperr.stats()
    assert (stats.delivered, stats.queued, stats.dropped_by_reason) == (81, 0, {"anonymous": 1})
    with pytest.raises(whisperr.WhisperrError):  # the middleware shut the module-level client down
        whisperr.get_client()


@pytest.mark.anyio
async def test_aiohttp_current_user(server: LocalServer) -> None:
    """Events tracked for the session's user, by the handler and by a task it started, each
    stored once for it; a visitor's is counted; the cleanup delivered them all."""
    module = load_example("aiohttp_current_user")
    app = module.create_app()
    sessions = sorted(module.SESSIONS)
    sent: dict[str, Signal] = {}

    async def call(http: httpx.AsyncClient, i: int) -> None:
        session, feature = sessions[i % len(sessions)], f"feature_{i}"
        response = await http.post(f"/features/{feature}", headers={"cookie": f"session={session}"})
        assert response.status_code == 202, response.text
        user = module.SESSIONS[session]
        sent[response.json()["message_id"]] = (user, "feature_used", {"feature": feature})

    async with aiohttp_serving(app) as url:
        with anyio.fail_after(30):
            async with (
                httpx.AsyncClient(base_url=url, trust_env=False) as http,
                anyio.create_task_group() as tg,
            ):
                for i in range(40):
                    tg.start_soon(call, http, i)
                visitor = await http.post("/features/export")  # no session: nobody signed in
    assert visitor.json() == {"message_id": None}

    stored = stored_once(server)
    assert {message_id: stored[message_id] for message_id in sent} == sent
    refreshed = [(user, "usage_refreshed", body) for user, _, body in sent.values()]
    later = [s for s in stored.values() if s[1] == "usage_refreshed"]
    assert sorted(later, key=repr) == sorted(refreshed, key=repr)
    assert len(stored) == 80
    stats = app[module.WHISPERR].stats()
    assert (stats.delivered, stats.queued, stats.dropped_by_reason) == (80, 0, {"anonymous": 2})
    with pytest.raises(whisperr.WhisperrError):  # setup() shut the module-level client down
        whisperr.get_client()


# -- scripts ---------------------------------------------------------------------------------


def test_asyncio_script(server: LocalServer) -> None:
    out = run_example("asyncio_script")
    assert "flushed: 4 delivered, 0 pending" in out
    assert "tracked=3 identified=1 delivered=4 dropped=0" in out
    assert list(stored_once(server).values()) == [
        ("user_8842", "payment_failed", {"amount_cents": 4900, "attempt": 1}),
        ("user_8842", "support_ticket_opened", {"topic": "billing"}),
        ("user_8842", "seats_removed", {"before": 12, "after": 3}),
    ]
    [identify] = server.app.identifies
    assert identify["external_user_id"] == "user_8842"
    assert identify["traits"] == {"plan": "pro", "seats": 12}
    assert [(c["channel"], c["address"]) for c in identify["channels"]] == [
        ("email", "ada@example.com")
    ]


def test_outbox_publisher(server: LocalServer, tmp_path: Path) -> None:
    """Every row lands once, with its id and time, through a 503; a second pass sends nothing."""
    server.app.faults.script([Fault.status(503)])
    database = str(tmp_path / "outbox.db")
    out = run_example("outbox_publisher", database)
    assert "published=3 failed=0" in out
    assert "ob-0001: published (status 202, attempts 2)" in out
    stored = {e["context"]["$message_id"]: e for e in server.app.events}
    assert set(stored) == server.app.sent_ids() == {"ob-0001", "ob-0002", "ob-0003"}
    with contextlib.closing(sqlite3.connect(database)) as db:  # `with db` alone does not close
        rows = dict(db.execute("select id, created_at from outbox").fetchall())
        states = {state for (state,) in db.execute("select state from outbox")}
    assert states == {"published"}
    for row_id, created_at in rows.items():
        when = datetime.fromisoformat(created_at)
        assert stored[row_id]["occurred_at"] == when.strftime("%Y-%m-%dT%H:%M:%S.") + (
            f"{when.microsecond // 1000:03d}Z"
        )
    assert "published=0 failed=0" in run_example("outbox_publisher", database)
    track = [r.status for r in server.app.requests if r.path == "/v1/events/track"]
    assert track == [503, 202, 202, 202]


def test_trio_script(server: LocalServer) -> None:
    out = run_example("trio_script")
    assert "tracked=3 identified=0 delivered=3 dropped=0" in out
    assert sorted(stored_once(server).values()) == [
        ("user_101", "usage_reviewed", {"logins_this_month": 3}),
        ("user_102", "account_inactive", {"days_since_login": 30}),
        ("user_103", "usage_reviewed", {"logins_this_month": 7}),
    ]


def test_worker(server: LocalServer) -> None:
    out = run_example("worker")
    assert "tracked=4 identified=0 delivered=4 dropped=0" in out
    assert stored_once(server) == {
        "job-0001:job_completed": ("user_17", "job_completed", {"job_id": "job-0001", "rows": 120}),
        "job-0002:job_completed": (
            "user_42",
            "job_completed",
            {"job_id": "job-0002", "rows": 3400},
        ),
        "job-0003:job_failed": (
            "user_17",
            "job_failed",
            {"job_id": "job-0003", "error": "nothing to export"},
        ),
        "job-0004:job_completed": ("user_99", "job_completed", {"job_id": "job-0004", "rows": 58}),
    }


def test_worker_rerun_is_idempotent(server: LocalServer) -> None:
    """Running the worker twice tracks every job twice; its message ids keep one copy each."""
    run_example("worker")
    run_example("worker")
    assert len(server.app.events) == 4
    assert sum(r.events for r in server.app.requests if r.path == "/v1/events/batch") == 8


def test_demo(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo needs no key and no network: it ignores WHISPERR_* variables that point away."""
    monkeypatch.setenv("WHISPERR_API_KEY", "wrk_not_used")
    monkeypatch.setenv("WHISPERR_BASE_URL", "http://127.0.0.1:9")  # would refuse connections
    out = run_example("demo")
    assert "Sent 2,000 requests" in out
    assert "the local server stored 2,000 (0 missing, 0 duplicates)" in out
    assert '"event_type": ' in out  # one event shown as JSON
    assert "Client stats: tracked=2,000 delivered=2,000 dropped=0" in out
    assert out.rstrip().endswith("OK: every event arrived exactly once.")
