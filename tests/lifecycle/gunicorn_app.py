"""Case 3: a WSGI app for `gunicorn --preload`: a client made, and one event tracked, at import.

With --preload the import runs in the master before it forks the workers. Each request to
/track/<n> tracks the event "gunicorn-request-<n>" from the worker that serves it; every other
path only answers (the readiness probe). The body is the pid of the worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import probe  # before whisperr: see probe's docstring

import whisperr

client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
client.track("preload", "payment_failed", {"pid": os.getpid()}, message_id="gunicorn-import")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path.startswith("/track/"):
        message_id = "gunicorn-request-" + path.removeprefix("/track/")
        client.track("worker", "payment_failed", {"pid": os.getpid()}, message_id=message_id)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
