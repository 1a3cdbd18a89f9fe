"""whisperr.aiohttp on a real aiohttp server (``web.AppRunner`` and ``TCPSite`` on 127.0.0.1).

The same checks as tests/test_asgi.py, on what the bundled local server stored: every event
once, for the user of the request that tracked it, also when requests of different users
interleave and when a task the handler started tracks after the response.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

import whisperr
from whisperr import ClientClosedError, WhisperrError
from whisperr.aiohttp import TRACKER, setup
from whisperr.server import LocalServer, create_app

from .conftest import API_KEY
from .test_asgi import (  # noqa: F401 (no_default_client: a fixture)
    WAIT,
    by_nonce,
    call_in_pairs,
    check_interleaved,
    meet,
    no_default_client,
)
from .test_examples import aiohttp_serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


async def header_user(request: web.Request) -> str | None:
    """The user named by the X-User header (async, as a lookup in a session store would be)."""
    await anyio.lowlevel.checkpoint()
    return request.headers.get("X-User")


@web.middleware
async def sign_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An auth middleware inside whisperr's, finding the user after it ran."""
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        whisperr.bind_user(authorization.removeprefix("Bearer "))
    return await handler(request)


async def job(nonce: str) -> None:
    """A task the handler starts and does not wait for: it finds the user in its context."""
    await anyio.lowlevel.checkpoint()
    whisperr.current().track("job_finished", {"nonce": nonce, "via": "task"})


def interleaving_app(server: LocalServer) -> web.Application:
    """An app on the module-level client, made at startup and shut down by setup()'s cleanup."""
    arrived: dict[int, anyio.Event] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def start(app: web.Application) -> None:
        app[CLIENT] = whisperr.init(api_key=API_KEY, base_url=server.url)

    async def work(request: web.Request) -> web.Response:
        me = request[TRACKER]
        user = me.user_id
        nonce = int(request.match_info["nonce"])
        await meet(arrived, nonce)  # another user's request runs between reading and tracking
        me.track("work_done", {"nonce": str(nonce), "via": "handler"})
        task = asyncio.create_task(job(str(nonce)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.json_response({"user": user, "same": whisperr.current().scope is me.scope})

    async def jobs_end(app: web.Application) -> None:
        with anyio.fail_after(WAIT):
            await asyncio.gather(*tasks)

    app = web.Application()
    app.on_startup.append(start)
    setup(app, resolve_user=header_user)
    app.middlewares.append(sign_in)  # after setup(): it runs inside whisperr's middleware
    for path in ("/work/{nonce}", "/auth/{nonce}", "/auth-sync/{nonce}"):
        app.router.add_post(path, work)
    app.on_shutdown.append(jobs_end)  # before on_cleanup, which shuts the client down
    return app


@pytest.mark.usefixtures("no_default_client")
async def test_interleaved_requests_track_for_their_own_user(server: LocalServer) -> None:
    """200 requests, met in pairs of different users mid-request, the user named by a header
    (resolve_user) or by an inner auth middleware (bind_user): each event is stored once for
    its own request's user, from the handler and from a task it started; the cleanup shuts
    the module-level client down, which delivers them all, and forgets it."""
    app = interleaving_app(server)
    async with aiohttp_serving(app) as url:
        answers = await call_in_pairs(url)
    with pytest.raises(WhisperrError):  # shut down and forgotten by the cleanup
        whisperr.get_client()
    check_interleaved(
        server, app[CLIENT], answers, {"handler": "work_done", "task": "job_finished"}
    )


async def test_client_given_is_closed_at_cleanup(server: LocalServer) -> None:
    """A handler that signs the user in itself; the client given to setup() is closed at the
    app's cleanup, after its cleanup_ctx, and delivers what the last request tracked."""
    client = whisperr.AsyncClient(api_key=API_KEY, base_url=server.url)

    async def teardown_tracks(app: web.Application) -> AsyncIterator[None]:
        yield
        client.track("user_3", "service_stopped", {"nonce": "teardown", "via": "cleanup_ctx"})

    async def login(request: web.Request) -> web.Response:
        request[TRACKER].track("login_started", {"nonce": "before", "via": "handler"})
        whisperr.bind_user("user_3")
        request[TRACKER].track("logged_in", {"nonce": "after", "via": "handler"})
        return web.Response(status=204)

    app = web.Application()
    app.cleanup_ctx.append(teardown_tracks)
    setup(app, client, request_id_header=None)
    app.router.add_post("/login", login)
    async with (
        aiohttp_serving(app) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=WAIT) as http,
    ):
        assert (await http.post("/login", headers={"X-Request-ID": "r1"})).status_code == 204
    assert by_nonce(server) == {
        ("after", "handler"): ("user_3", "logged_in"),
        ("teardown", "cleanup_ctx"): ("user_3", "service_stopped"),
    }
    assert [e["context"].get("request_id") for e in server.app.events] == [None, None]
    stats = client.stats()
    assert (stats.delivered, stats.queued, stats.dropped_by_reason) == (2, 0, {"anonymous": 1})
    with pytest.raises(ClientClosedError):
        client.track("user_3", "after_shutdown")


CLIENT = web.AppKey("client", whisperr.AsyncClient)


def test_importing_whisperr_imports_no_framework() -> None:
    """``import whisperr`` and ``import whisperr.asgi`` load neither aiohttp nor Starlette, and
    ``whisperr.aiohttp`` imports the real aiohttp, not itself."""
    code = (
        "import sys, whisperr, whisperr.asgi\n"
        "assert not {'aiohttp', 'starlette', 'fastapi'} & set(sys.modules), sys.modules\n"
        "import whisperr.aiohttp, aiohttp.web\n"
        "assert whisperr.aiohttp.web is aiohttp.web and aiohttp.__name__ == 'aiohttp'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
