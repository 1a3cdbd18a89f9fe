"""A FastAPI service that tracks for the signed-in user, without passing user ids around.

``WhisperrMiddleware`` binds who each request is for. The auth dependency names the user with
``whisperr.bind_user()`` once it has checked the token, and every part of the request sees it:
the route's ``Depends(tracker)``, and the background task that runs after the response. A
visitor nobody signed in tracks nothing; the event is counted (``dropped_by_reason
["anonymous"]``). ``manage_lifespan=True`` shuts the module-level client down when the server
stops, delivering what the last requests tracked.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/fastapi_current_user.py
    curl -X POST localhost:8000/exports -H 'authorization: Bearer tok_ada' \
        -H 'content-type: application/json' -d '{"format": "csv"}'
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

import whisperr
from whisperr.asgi import WhisperrMiddleware, tracker

TOKENS = {"tok_ada": "user_8842", "tok_lin": "user_1203"}  # a stand-in for your auth

# The current request's tracker: `track()` and `identify()` for whoever the request is for.
Tracker = Annotated[whisperr.UserTracker, Depends(tracker)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.whisperr = whisperr.init()  # WHISPERR_* settings; kept for its stats()
    yield
    # No shutdown here: the middleware (manage_lifespan=True) shuts the client down after this.


async def maybe_signed_in(authorization: Annotated[str, Header()] = "") -> str | None:
    """The auth dependency: checks the token, then tells whisperr who the request is for."""
    user_id = TOKENS.get(authorization.removeprefix("Bearer "))
    whisperr.bind_user(user_id)
    return user_id


async def signed_in(user_id: Annotated[str | None, Depends(maybe_signed_in)]) -> str:
    if user_id is None:
        raise HTTPException(status_code=401)
    return user_id


class Export(BaseModel):
    format: str = "csv"


async def build_export(export_format: str) -> None:
    # A BackgroundTasks job runs after the response, still in the request's scope.
    (await tracker()).track("export_ready", {"format": export_format})


def create_app() -> FastAPI:
    app = FastAPI(title="whisperr FastAPI current-user example", lifespan=lifespan)
    # Added last, so it runs first: each request's scope is bound before any dependency.
    app.add_middleware(WhisperrMiddleware, manage_lifespan=True)

    @app.post("/exports", status_code=202, dependencies=[Depends(signed_in)])
    async def request_export(
        body: Export, background: BackgroundTasks, me: Tracker
    ) -> dict[str, str | None]:
        message_id = me.track("export_requested", {"format": body.format})
        background.add_task(build_export, body.format)
        return {"message_id": message_id}

    @app.get("/pricing", dependencies=[Depends(maybe_signed_in)])
    async def pricing(me: Tracker) -> dict[str, str | None]:
        # Public: a visitor who is not signed in tracks nothing (counted as "anonymous").
        return {"message_id": me.track("pricing_viewed")}

    return app


app = create_app()  # for `uvicorn examples.fastapi_current_user:app` and friends


def main() -> None:
    uvicorn.run(app, host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
