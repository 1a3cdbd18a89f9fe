"""aiohttp: the current request's user, and the client's life with the app's.

:func:`whisperr_middleware` binds a :class:`~whisperr.RequestScope` around each handler, in the
request's own task, and puts its :class:`~whisperr.UserTracker` at ``request[TRACKER]``;
tasks the handler starts copy the binding and keep the user, and a middleware or handler that
finds the user later calls :func:`whisperr.bind_user`. :func:`setup` adds the middleware and
closes the client when the app is cleaned up.

Lifetime: one middleware per app; one scope per request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ._client import AsyncClient
from ._default import get_client, shutdown
from ._scope import UserTracker, bind

__all__ = ["TRACKER", "setup", "whisperr_middleware"]

ResolveUser = Callable[[web.Request], "str | Awaitable[str | None] | None"]

# Where the tracker is: a typed key from aiohttp 3.14 (which warns about plain string keys),
# "whisperr" before.
if hasattr(web, "RequestKey"):  # noqa: SIM108
    TRACKER = web.RequestKey("tracker", UserTracker)
else:
    TRACKER = "whisperr"  # type: ignore[assignment,unused-ignore]


def whisperr_middleware(
    client: AsyncClient | None = None,
    *,
    resolve_user: ResolveUser | None = None,
    request_id_header: str | None = "X-Request-ID",
) -> Middleware:
    """A middleware binding who each request is for around the handlers below it.

    ``resolve_user(request)``, plain or ``async``, returns the user id or None (nobody signed
    in); without it the user is None until :func:`whisperr.bind_user` names one. The value of
    the ``request_id_header`` becomes the scope's request id (None: no request id).
    ``client`` defaults to ``whisperr.get_client()``, looked up at each request.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        user_id: str | None = None
        if resolve_user is not None:
            found = resolve_user(request)
            user_id = await found if inspect.isawaitable(found) else found
        request_id = None if request_id_header is None else request.headers.get(request_id_header)
        with bind(user_id, request_id=request_id) as scope:
            request[TRACKER] = UserTracker(get_client() if client is None else client, scope)
            return await handler(request)

    return middleware


def setup(
    app: web.Application,
    client: AsyncClient | None = None,
    *,
    resolve_user: ResolveUser | None = None,
    request_id_header: str | None = "X-Request-ID",
) -> None:
    """Add :func:`whisperr_middleware` to ``app`` and close the client at its cleanup.

    The middleware goes after those already added (so it runs inside them, and
    ``resolve_user`` sees what they set). The client is closed after the app's
    ``cleanup_ctx`` and the ``on_cleanup`` callbacks added before, delivering what is queued
    within ``shutdown_timeout``; the default client (``client`` None) by ``whisperr.shutdown()``.
    """
    app.middlewares.append(
        whisperr_middleware(client, resolve_user=resolve_user, request_id_header=request_id_header)
    )

    async def close(app: web.Application) -> None:
        if client is None:
            await shutdown()
        else:
            await client.aclose()

    app.on_cleanup.append(close)
