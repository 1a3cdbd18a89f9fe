"""An aiohttp service that reports churn signals to Whisperr.

The client lives in a ``cleanup_ctx`` generator: opened when the app starts, closed (delivering
whatever is still queued) when it stops. Handlers find it under an ``AppKey``.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/aiohttp_app.py
    curl -X POST localhost:8080/users/user_8842/feature-used \
        -H 'content-type: application/json' -d '{"feature": "export"}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

import whisperr

WHISPERR = web.AppKey("whisperr", whisperr.AsyncClient)


async def whisperr_client(app: web.Application) -> AsyncIterator[None]:
    # Runs up to `yield` at startup and the rest at cleanup. Settings.from_env() reads
    # WHISPERR_API_KEY, WHISPERR_BASE_URL and any other WHISPERR_* variable.
    async with whisperr.AsyncClient(whisperr.Settings.from_env()) as client:
        app[WHISPERR] = client
        yield
    # Leaving the `async with` delivered everything queued, within shutdown_timeout (10 s).


async def feature_used(request: web.Request) -> web.Response:
    body = await request.json()
    # track() validates and queues in microseconds; a background task batches and delivers.
    message_id = request.app[WHISPERR].track(
        request.match_info["user_id"], "feature_used", {"feature": str(body["feature"])}
    )
    return web.json_response({"message_id": message_id}, status=202)


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(whisperr_client)
    app.router.add_post("/users/{user_id}/feature-used", feature_used)
    return app


def main() -> None:
    web.run_app(create_app(), host="127.0.0.1", port=8080)


if __name__ == "__main__":
    main()
