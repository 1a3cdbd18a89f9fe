"""ASGI: the current request's user for Starlette, FastAPI and any other ASGI app.

:class:`WhisperrMiddleware` binds a :class:`~whisperr.RequestScope` around each HTTP request
and WebSocket connection, in the task that runs it, and resets it after. Below it,
``request.state.whisperr`` and the :func:`tracker` dependency track for that user; the tasks the
request starts (``BackgroundTasks``, ``asyncio.create_task``) copy the binding and keep the
user, and an auth step that finds the user later calls :func:`whisperr.bind_user`, which the
whole request then sees. Nothing here imports Starlette.

Lifetime: one middleware per app; one scope per connection.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._client import AsyncClient
from ._default import get_client, shutdown
from ._errors import WhisperrError
from ._scope import UserTracker, bind

__all__ = ["WhisperrMiddleware", "tracker"]

logger = logging.getLogger("whisperr")

# The ASGI types, as Starlette spells them (so its add_middleware() type-checks).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ResolveUser = Callable[[Scope], "str | Awaitable[str | None] | None"]

_tracker: contextvars.ContextVar[UserTracker | None] = contextvars.ContextVar(
    "whisperr_asgi_tracker", default=None
)


def _authenticated_user(scope: Scope) -> str | None:
    """The ``identity`` of the user Starlette's ``AuthenticationMiddleware`` set, if signed in."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return None
    identity: str = user.identity
    return identity or None


class WhisperrMiddleware:
    """Binds who each HTTP request and WebSocket connection is for, around the app below.

    ``resolve_user(scope)``, plain or ``async``, returns the user id or None (nobody signed
    in). By default it is the ``identity`` of ``scope["user"]`` when that user
    ``is_authenticated``, as Starlette's ``AuthenticationMiddleware`` sets it: that middleware
    must then run before this one (added after it with ``add_middleware``). The value of the
    ``request_id_header`` becomes the scope's request id (None: no request id).

    ``client`` defaults to ``whisperr.get_client()``, looked up at each request, so
    ``whisperr.init()`` may run in the app's lifespan (a request before it fails with
    ``WhisperrError``). With ``manage_lifespan=True`` the client
    is closed at the lifespan's shutdown, after the app's own shutdown and before the server
    is told it is complete (the default client by ``whisperr.shutdown()``); an app that does
    not implement the lifespan gets one that does only that.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncClient | None = None,
        resolve_user: ResolveUser | None = None,
        request_id_header: str | None = "x-request-id",
        manage_lifespan: bool = False,
    ) -> None:
        self.app = app
        self.client = client
        self.resolve_user = _authenticated_user if resolve_user is None else resolve_user
        self.manage_lifespan = manage_lifespan
        self._request_id_header = (
            None if request_id_header is None else request_id_header.lower().encode("latin-1")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket"):
            await self._connection(scope, receive, send)
        elif kind == "lifespan" and self.manage_lifespan:
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _connection(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with the connection's scope bound and its tracker in ``scope["state"]``."""
        found = self.resolve_user(scope)
        user_id = await found if inspect.isawaitable(found) else found
        client = get_client() if self.client is None else self.client
        with bind(user_id, request_id=self._request_id(scope)) as request_scope:
            tracker = UserTracker(client, request_scope)
            scope.setdefault("state", {})["whisperr"] = tracker
            token = _tracker.set(tracker)
            try:
                await self.app(scope, receive, send)
            finally:
                _tracker.reset(token)

    def _request_id(self, scope: Scope) -> str | None:
        if self._request_id_header is not None:
            for name, value in scope.get("headers", ()):
                if name == self._request_id_header:
                    return bytes(value).decode("latin-1")
        return None

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's lifespan, with the client closed before its shutdown is answered."""
        read = False

        async def app_receive() -> Message:
            nonlocal read
            read = True
            return await receive()

        async def app_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._close()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception:
            if read:
                raise
            # Raising before reading a message is how an app says it has no lifespan (the spec:
            # the server then goes on without one); this one answers it instead.
            logger.debug("the app does not implement the ASGI lifespan; WhisperrMiddleware does")
        else:
            if read:
                return
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self._close()
        await send({"type": "lifespan.shutdown.complete"})

    async def _close(self) -> None:
        if self.client is None:
            await shutdown()
        else:
            await self.client.aclose()


async def tracker() -> UserTracker:
    """The current request's :class:`~whisperr.UserTracker`, as ``Depends(tracker)`` in FastAPI.

    It is the ``request.state.whisperr`` of the request, and stays valid in the tasks the
    request starts. An ``async def``, so FastAPI calls it on the request's task rather than in
    its thread pool.

    Raises:
        WhisperrError: no :class:`WhisperrMiddleware` handles the current request.
    """
    found = _tracker.get()
    if found is None:
        raise WhisperrError(
            "no WhisperrMiddleware handles this request: app.add_middleware(WhisperrMiddleware)"
        )
    return found
