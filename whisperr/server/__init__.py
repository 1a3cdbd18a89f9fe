"""A local Whisperr-compatible ingestion server, for tests, demos and benchmarks.

Run it in a background thread and point a client at it:

    from whisperr.server import Fault, LocalServer, create_app

    with LocalServer(create_app(api_key="wrk_test")) as server:
        server.app.faults.script([Fault.status(503, retry_after="1"), Fault.lost_ack()])
        ...  # send to server.url; the next two requests fail, then it recovers
        assert len(server.app.events) == expected

Or drive the ASGI app in-process with `httpx.ASGITransport(app=create_app())` (connection
faults, which hang up instead of answering, need the real server), or from a shell:
`python -m whisperr.server --port 8787 --fault-mix "503=0.2,close=0.1" --seed 7`.
"""

from __future__ import annotations

from whisperr.server._app import ReceiptShape, RequestRecord, WhisperrApp, create_app
from whisperr.server._faults import DropConnection, Fault, Faults
from whisperr.server._http import LocalServer, serve

__all__ = [
    "DropConnection",
    "Fault",
    "Faults",
    "LocalServer",
    "ReceiptShape",
    "RequestRecord",
    "WhisperrApp",
    "create_app",
    "serve",
]
