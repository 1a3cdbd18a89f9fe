"""An aiohttp service that tracks for the signed-in user, without passing user ids around.

``whisperr.aiohttp.setup()`` adds a middleware that binds who each request is for (here, the
user of the session cookie) and puts a tracker for that user at ``request[TRACKER]``; tasks the
handler starts keep the user, through ``whisperr.current()``. A visitor nobody signed in tracks
nothing; the event is counted (``dropped_by_reason["anonymous"]``). The app's cleanup closes
the client, delivering what the last requests tracked.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/aiohttp_current_user.py
    curl -X POST localhost:8080/features/export --cookie session=sess_ada
"""

from __future__ import annotations

import asyncio

from aiohttp import web

import whisperr
import whisperr.aiohttp
from whisperr.aiohttp import TRACKER

SESSIONS = {"sess_ada": "user_8842", "sess_lin": "user_1203"}  # a stand-in for your sessions
WHISPERR = web.AppKey("whisperr", whisperr.AsyncClient)
JOBS = web.AppKey[set[asyncio.Task[None]]]("jobs")


def session_user(request: web.Request) -> str | None:
    """Who the request is for: the user of its session cookie, or None."""
    return SESSIONS.get(request.cookies.get("session", ""))


async def refresh_usage(feature: str) -> None:
    # A task the handler started: whisperr.current() still tracks for the request's user.
    await asyncio.sleep(0)
    whisperr.current().track("usage_refreshed", {"feature": feature})


async def feature_used(request: web.Request) -> web.Response:
    feature = request.match_info["feature"]
    message_id = request[TRACKER].track("feature_used", {"feature": feature})
    job = asyncio.create_task(refresh_usage(feature))
    request.app[JOBS].add(job)
    job.add_done_callback(request.app[JOBS].discard)
    return web.json_response({"message_id": message_id}, status=202)


async def start(app: web.Application) -> None:
    # The module-level client (WHISPERR_* settings), which setup() closes at the cleanup.
    app[WHISPERR] = whisperr.init()


async def jobs_end(app: web.Application) -> None:
    await asyncio.gather(*app[JOBS])  # before the cleanup closes the client


def create_app() -> web.Application:
    app = web.Application()
    app[JOBS] = set()
    app.on_startup.append(start)
    app.on_shutdown.append(jobs_end)
    whisperr.aiohttp.setup(app, resolve_user=session_user)
    app.router.add_post("/features/{feature}", feature_used)
    return app


def main() -> None:
    web.run_app(create_app(), host="127.0.0.1", port=8080)


if __name__ == "__main__":
    main()
