"""whisperr.asgi on real frameworks: FastAPI and Starlette apps served by uvicorn on 127.0.0.1
(WebSocket connections driven in process: uvicorn would need a WebSocket library).

Each test checks what the bundled local server stored: every event once, for the user of the
request that tracked it, also when requests of different users interleave and when the event
is tracked by a background task after the response.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Header
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import whisperr
from whisperr import ClientClosedError, UserTracker, WhisperrError
from whisperr.asgi import ASGIApp, Message, Receive, Scope, Send, WhisperrMiddleware, tracker
from whisperr.server import LocalServer, create_app

from .conftest import API_KEY
from .test_examples import stored_once, uvicorn_serving

pytestmark = pytest.mark.anyio

PAIRS = 100  # 200 requests, each meeting its partner of another user mid-request
WAIT = 10.0  # the bound on every wait of a test


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


@pytest.fixture
def no_default_client() -> Iterator[None]:
    """A test that sets the module-level client leaves none behind, even when it fails."""
    yield
    anyio.run(whisperr.shutdown)


def by_nonce(server: LocalServer) -> dict[tuple[str, str], tuple[str, str]]:
    """(nonce, via) -> (user, event type) of every stored event, each stored and sent once."""
    stored = stored_once(server).values()
    found = {(p["nonce"], p["via"]): (user, kind) for user, kind, p in stored}
    assert len(found) == len(stored)
    return found


# -- FastAPI: 200 interleaved requests of different users ------------------------------------


async def header_user(scope: Scope) -> str | None:
    """The user named by the X-User header (async, as a lookup in a session store would be)."""
    await anyio.lowlevel.checkpoint()
    return Headers(scope=scope).get("x-user")


async def sign_in(authorization: str = Header()) -> None:
    """An auth dependency that finds the user after the middleware ran."""
    whisperr.bind_user(authorization.removeprefix("Bearer "))


def sign_in_sync(authorization: str = Header()) -> None:
    """The same, as a plain def: FastAPI runs it in its thread pool."""
    whisperr.bind_user(authorization.removeprefix("Bearer "))


async def follow_up(nonce: str) -> None:
    """A BackgroundTasks job: runs after the response, finds the tracker by itself."""
    await anyio.lowlevel.checkpoint()
    (await tracker()).track("work_followed_up", {"nonce": nonce, "via": "background"})


async def job(nonce: str) -> None:
    """A task the endpoint starts and does not wait for."""
    for _ in range(random.randrange(1, 4)):
        await anyio.lowlevel.checkpoint()
    (await tracker()).track("job_finished", {"nonce": nonce, "via": "task"})


async def meet(arrived: dict[int, anyio.Event], nonce: int) -> None:
    """Wait until request ``nonce ^ 1`` (the partner, of another user) is here too."""
    arrived.setdefault(nonce, anyio.Event()).set()
    with anyio.fail_after(WAIT):
        await arrived.setdefault(nonce ^ 1, anyio.Event()).wait()
    for _ in range(random.randrange(3)):
        await anyio.lowlevel.checkpoint()


def request_for(i: int) -> tuple[str, dict[str, str], str | None]:
    """Request i's path, headers and user: named by a header, by an auth step, or nobody."""
    user = f"user_{i % 17}"
    headers = {"x-request-id": f"req-{i}"}
    kind = i % 5
    if kind in (0, 3):
        return f"/work/{i}", {**headers, "x-user": user}, user
    if kind in (1, 2):
        path = "/auth" if kind == 1 else "/auth-sync"
        return f"{path}/{i}", {**headers, "authorization": f"Bearer {user}"}, user
    return f"/work/{i}", headers, None


async def call_in_pairs(url: str) -> dict[int, Any]:
    """POST the requests of ``request_for``, both of each pair together; their JSON answers."""
    answers: dict[int, Any] = {}

    async def call(http: httpx.AsyncClient, i: int) -> None:
        path, headers, _ = request_for(i)
        response = await http.post(path, headers=headers)
        assert response.status_code == 200, response.text
        answers[i] = response.json()

    async def pair(http: httpx.AsyncClient, slots: anyio.Semaphore, p: int) -> None:
        async with slots, anyio.create_task_group() as tg:
            tg.start_soon(call, http, 2 * p)
            tg.start_soon(call, http, 2 * p + 1)

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=WAIT) as http:
        slots = anyio.Semaphore(16)  # 32 requests at most: below httpx's 100 connections
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for p in range(PAIRS):
                    tg.start_soon(pair, http, slots, p)
    return answers


def check_interleaved(
    server: LocalServer,
    client: whisperr.AsyncClient,
    answers: dict[int, Any],
    tracked: dict[str, str],
) -> None:
    """Each request saw its own user, and each event of ``tracked`` (via: event type) is
    stored once for its request's user, with its request id; the client is closed, everything
    delivered, and the events of the anonymous requests counted as dropped."""
    users = {i: request_for(i)[2] for i in range(2 * PAIRS)}
    assert answers == {i: {"user": users[i], "same": True} for i in users}
    named = [i for i, user in users.items() if user is not None]
    assert by_nonce(server) == {
        (str(i), via): (users[i], kind) for i in named for via, kind in tracked.items()
    }
    assert {e["context"]["request_id"] for e in server.app.events} == {f"req-{i}" for i in named}
    anonymous = len(tracked) * (len(users) - len(named))
    stats = client.stats()
    delivered = len(tracked) * len(named)
    assert (stats.tracked, stats.delivered, stats.queued) == (delivered + anonymous, delivered, 0)
    assert stats.dropped_by_reason == {"anonymous": anonymous}
    with pytest.raises(ClientClosedError):
        client.track("user_1", "after_shutdown")


def interleaving_app(client: whisperr.AsyncClient) -> FastAPI:
    arrived: dict[int, anyio.Event] = {}
    tasks: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        with anyio.fail_after(WAIT):  # the app's own shutdown: its jobs end (and track) first
            await asyncio.gather(*tasks)

    async def work(
        nonce: int,
        request: Request,
        background: BackgroundTasks,
        me: Annotated[UserTracker, Depends(tracker)],
    ) -> dict[str, Any]:
        user = me.user_id
        await meet(arrived, nonce)  # another user's request runs between reading and tracking
        me.track("work_done", {"nonce": str(nonce), "via": "handler"})
        background.add_task(follow_up, str(nonce))
        task = asyncio.create_task(job(str(nonce)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {"user": user, "same": request.state.whisperr is me}

    app = FastAPI(lifespan=lifespan)
    app.add_api_route("/work/{nonce}", work, methods=["POST"])
    app.add_api_route("/auth/{nonce}", work, methods=["POST"], dependencies=[Depends(sign_in)])
    app.add_api_route(
        "/auth-sync/{nonce}", work, methods=["POST"], dependencies=[Depends(sign_in_sync)]
    )
    app.add_middleware(
        WhisperrMiddleware, client=client, resolve_user=header_user, manage_lifespan=True
    )
    return app


async def test_interleaved_requests_track_for_their_own_user(server: LocalServer) -> None:
    """200 requests, met in pairs of different users mid-request: each event is stored once for
    its own request's user, from the handler, a BackgroundTasks job and a task it started;
    closing at uvicorn's shutdown, after the app's own, delivers them all."""
    client = whisperr.AsyncClient(api_key=API_KEY, base_url=server.url)
    with uvicorn_serving(interleaving_app(client)) as url:
        answers = await call_in_pairs(url)
    tracked = {"handler": "work_done", "background": "work_followed_up", "task": "job_finished"}
    check_interleaved(server, client, answers, tracked)


# -- Starlette: its AuthenticationMiddleware's user, the default client ----------------------


class HeaderAuth(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        user = conn.headers.get("x-user")
        return None if user is None else (AuthCredentials(["authenticated"]), SimpleUser(user))


async def page(request: Request) -> PlainTextResponse:
    nonce = request.path_params["nonce"]
    request.state.whisperr.track("page_viewed", {"nonce": nonce, "via": "state"})
    whisperr.current().track("page_read", {"nonce": nonce, "via": "current"})
    return PlainTextResponse(str(request.state.whisperr.user_id))


async def test_starlette_authenticated_user_and_default_client(
    server: LocalServer, no_default_client: None
) -> None:
    """The user Starlette's AuthenticationMiddleware signed in, on the module-level client made
    in the lifespan; a request with nobody signed in tracks nothing and counts it; the
    lifespan's shutdown closes and forgets the client."""
    clients: list[whisperr.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        clients.append(whisperr.init(api_key=API_KEY, base_url=server.url))
        yield

    app = Starlette(
        routes=[Route("/pages/{nonce}", page)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=HeaderAuth()),
            Middleware(WhisperrMiddleware, manage_lifespan=True),
        ],
        lifespan=lifespan,
    )

    async def call(http: httpx.AsyncClient, i: int) -> None:
        headers = {"x-user": f"user_{i % 3}"} if i % 4 else {}
        response = await http.get(f"/pages/{i}", headers=headers)
        assert response.text == headers.get("x-user", "None")

    with uvicorn_serving(app) as url:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=WAIT) as http:
            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:
                    for i in range(40):
                        tg.start_soon(call, http, i)

    assert by_nonce(server) == {
        (str(i), via): (f"user_{i % 3}", kind)
        for i in range(40)
        if i % 4
        for via, kind in (("state", "page_viewed"), ("current", "page_read"))
    }
    [client] = clients
    stats = client.stats()
    assert (stats.delivered, stats.queued, stats.dropped_by_reason) == (60, 0, {"anonymous": 20})
    with pytest.raises(WhisperrError):  # whisperr.shutdown() forgot it
        whisperr.get_client()


# -- the lifespan of an app without one; WebSockets; no middleware ---------------------------


def bare_app(lifespan: str) -> Any:
    """A plain ASGI app that tracks one event per request and does not implement the lifespan:
    it raises on a lifespan scope, or returns at once."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if lifespan == "raises":
                raise RuntimeError("http only")
            return
        scope["state"]["whisperr"].track("pinged", {"nonce": scope["path"][1:], "via": "bare"})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("lifespan", ["raises", "returns"])
async def test_app_without_lifespan_gets_one_that_closes_the_client(
    server: LocalServer, lifespan: str
) -> None:
    """uvicorn (lifespan "on") starts such an app, and its shutdown closes the client, which
    delivers the last request's event."""
    client = whisperr.AsyncClient(api_key=API_KEY, base_url=server.url)
    app = WhisperrMiddleware(
        bare_app(lifespan),
        client=client,
        resolve_user=lambda scope: "user_7",
        manage_lifespan=True,
    )
    with uvicorn_serving(app) as url:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=WAIT) as http:
            assert (await http.post("/last")).status_code == 204
    assert by_nonce(server) == {("last", "bare"): ("user_7", "pinged")}
    with pytest.raises(ClientClosedError):
        client.track("user_7", "after_shutdown")


async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        websocket.state.whisperr.track("message_sent", {"nonce": text, "via": "websocket"})
        await websocket.send_text(text)


@asynccontextmanager
async def websocket(app: ASGIApp, user: str) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """A WebSocket connection to ``app``, driven in process (uvicorn would need a WebSocket
    library this environment lacks); yields a function that sends a text and returns the reply."""
    to_app, app_receive = anyio.create_memory_object_stream[Message](8)
    app_send, from_app = anyio.create_memory_object_stream[Message](8)
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/chat",
        "query_string": b"",
        "headers": [(b"x-user", user.encode())],
        "subprotocols": [],
    }

    async def connection() -> None:
        await app(scope, app_receive.receive, app_send.send)

    async def echo(text: str) -> str:
        await to_app.send({"type": "websocket.receive", "text": text})
        answer: str = (await from_app.receive())["text"]
        return answer

    async with to_app, app_receive, app_send, from_app, anyio.create_task_group() as tg:
        tg.start_soon(connection)
        await to_app.send({"type": "websocket.connect"})
        assert (await from_app.receive())["type"] == "websocket.accept"
        yield echo
        await to_app.send({"type": "websocket.disconnect", "code": 1000})


async def test_websocket_connections_track_for_their_own_user(server: LocalServer) -> None:
    """Two WebSocket connections of different users, open together, their messages alternating."""
    client = whisperr.AsyncClient(api_key=API_KEY, base_url=server.url)
    app = Starlette(
        routes=[WebSocketRoute("/chat", chat)],
        middleware=[
            Middleware(
                WhisperrMiddleware,
                client=client,
                resolve_user=lambda scope: Headers(scope=scope).get("x-user"),
            )
        ],
    )
    with anyio.fail_after(WAIT):
        async with websocket(app, "user_a") as a, websocket(app, "user_b") as b:
            for i in range(10):
                assert await (a if i % 2 else b)(str(i)) == str(i)
        await client.aclose()
    assert by_nonce(server) == {
        (str(i), "websocket"): ("user_a" if i % 2 else "user_b", "message_sent") for i in range(10)
    }


async def test_tracker_outside_the_middleware_raises() -> None:
    with pytest.raises(WhisperrError, match="no WhisperrMiddleware"):
        await tracker()
