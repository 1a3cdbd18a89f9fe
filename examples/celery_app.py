"""A Celery app whose tasks report to Whisperr through the module-level client.

``whisperr.celery.setup(app)`` makes each pool process deliver what a task tracked right after
the task (within 2 s), and close the client when the process ends; the client made here, in
the worker's master, starts empty in every forked pool process.

Configuration comes from the environment: ``WHISPERR_API_KEY`` (and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API), ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``.
To try it against the bundled local server and a local redis-server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    redis-server --port 6379 --save ""
    cd examples
    export WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787
    celery -A celery_app worker --loglevel=INFO
    python -c "from celery_app import send_receipt; send_receipt.delay('user_8842', 'ord-1', 4900)"
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import whisperr
import whisperr.celery

REDIS = "redis://127.0.0.1:6379/0"

app = Celery(
    "celery_app",
    broker=os.environ.get("CELERY_BROKER_URL", REDIS),
    backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS),
)
whisperr.init()  # WHISPERR_API_KEY and the other WHISPERR_* variables
whisperr.celery.setup(app)


@app.task
def send_receipt(user_id: str, order_id: str, amount_cents: int) -> dict[str, Any]:
    """Send an order's receipt (the actual work is left out) and report it."""
    # The order id as message_id: a retried task tracks again, and the server keeps one copy.
    whisperr.track(
        user_id,
        "receipt_sent",
        {"order_id": order_id, "amount_cents": amount_cents},
        message_id=f"receipt:{order_id}",
    )
    return {"order_id": order_id, "pid": os.getpid()}
