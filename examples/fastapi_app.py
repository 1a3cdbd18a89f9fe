"""A FastAPI service that reports churn signals to Whisperr.

The module-level client is opened in the app's lifespan (``whisperr.init()``, on the server's
event loop), flushed and closed when the server shuts down. ``whisperr.track()`` is a plain call
that queues in microseconds and never waits for the network, so it is fine both in ``async def``
routes and in plain ``def`` routes (which FastAPI runs in a thread pool: ``track()`` is
thread-safe).

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/fastapi_app.py
    curl -X POST localhost:8000/users/user_8842/payment-failed \
        -H 'content-type: application/json' -d '{"amount_cents": 4900}'
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

import whisperr


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # init() reads WHISPERR_API_KEY, WHISPERR_BASE_URL and any other WHISPERR_* variable
    # (WHISPERR_FLUSH_INTERVAL, WHISPERR_DISABLED, ...). Made here, on the server's loop, the
    # client delivers events tracked from the thread pool too.
    app.state.whisperr = whisperr.init()  # kept for its stats()
    yield
    await whisperr.flush(timeout=5)  # deliver what the last requests tracked
    await whisperr.shutdown()  # then close the pool (and account for anything left)


class PaymentFailed(BaseModel):
    amount_cents: int
    decline_code: str = "card_declined"


def create_app() -> FastAPI:
    app = FastAPI(title="whisperr FastAPI example", lifespan=lifespan)

    @app.post("/users/{user_id}/payment-failed", status_code=202)
    async def payment_failed(user_id: str, body: PaymentFailed) -> dict[str, str]:
        # An async route: track() queues and returns at once; a background task delivers.
        message_id = whisperr.track(user_id, "payment_failed", body.model_dump())
        return {"message_id": message_id}

    @app.post("/users/{user_id}/cancel", status_code=202)
    def cancel_subscription(user_id: str, reason: str = "too_expensive") -> dict[str, str]:
        # A plain `def` route runs in FastAPI's thread pool; track() is safe from any thread.
        message_id = whisperr.track(user_id, "subscription_cancelled", {"reason": reason})
        return {"message_id": message_id}

    return app


app = create_app()  # for `uvicorn examples.fastapi_app:app` and friends


def main() -> None:
    uvicorn.run(app, host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
