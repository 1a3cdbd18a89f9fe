"""The local ingestion app: an ASGI 3 callable that routes, authenticates, stores and misbehaves."""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Literal, final

import anyio
import attrs
import orjson

from whisperr.server._echo import echo_lines
from whisperr.server._faults import DropConnection, Fault, Faults
from whisperr.server._rules import (
    INVALID,
    Problem,
    batch_problem,
    event_check,
    identify_problem,
    located,
)

Scope = MutableMapping[str, Any]  # the ASGI spelling, so httpx.ASGITransport et al. accept the app
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = tuple[tuple[bytes, bytes], ...]

logger = logging.getLogger("whisperr.server")
_MESSAGE_ID = re.compile(rb'"\$message_id"\s*:\s*"((?:[^"\\]|\\.)*)"')

_MAX_INFLATED_BYTES = 64 * 1024 * 1024
_HANG_LIMIT_SECONDS = 300.0  # a hung request gives up by itself after this long
_ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}
_ERROR_CODES |= {413: "payload_too_large", 429: "rate_limited", 503: "service_unavailable"}


@final
@attrs.frozen
class RequestRecord:
    """What the server saw of one request; `status` is None when it hung up instead of answering.

    Records are made as the app settles each request's outcome, not as requests arrive;
    `WhisperrApp.requests` says when exactly.
    """

    method: str
    path: str
    status: int | None
    events: int
    body_bytes: int
    fault: Fault | None


# The shapes of a `POST /v1/events/track` answer that the API's sources document.
ReceiptShape = Literal["event", "queued", "durable"]
RECEIPT_SHAPES: tuple[ReceiptShape, ...] = ("event", "queued", "durable")


@attrs.frozen
class _Request:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    data: Any  # the parsed body, or INVALID

    @classmethod
    def build(cls, scope: Scope, body: bytes, *, parse: bool = True) -> _Request:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        encoding = headers.get("content-encoding", "")
        if not parse and scope["path"] == "/v1/events/batch" and not encoding:
            # Benchmark mode: only the idempotency keys, found without parsing the JSON.
            ids = _MESSAGE_ID.findall(body)
            data = {"events": [{"context": {"$message_id": i.decode()}} for i in ids]}
        else:
            data = _decode(body, encoding)
        return cls(scope["method"], scope["path"], headers, body, data)


@attrs.frozen
class _Response:
    status: int
    payload: Any
    headers: Headers = ()


@attrs.frozen
class _Route:
    method: str
    handler: Callable[[WhisperrApp, _Request], _Response]
    ingest: bool = True  # faults, latency and request records apply
    auth: bool = True


@final
class WhisperrApp:
    """A local Whisperr ingestion API as a plain ASGI 3 app; build it with `create_app`.

    The read-back properties are safe to use from another thread while the app serves.
    `faults` holds the fault knobs (see `Faults`).
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        clock: Callable[[], float],
        faults: Faults,
        echo: bool,
        validate: bool = True,
        receipt: ReceiptShape = "event",
    ) -> None:
        if receipt not in RECEIPT_SHAPES:
            raise ValueError(f"receipt must be one of {', '.join(RECEIPT_SHAPES)}, got {receipt!r}")
        self.faults = faults
        self.receipt: ReceiptShape = receipt
        self._api_key = None if api_key is None else api_key.encode()
        self._clock, self._echo, self._validate = clock, echo, validate
        self._lock = threading.Lock()
        self.reset()

    def __repr__(self) -> str:
        return f"<WhisperrApp events={len(self._events)} auth={self._api_key is not None}>"

    @property
    def events(self) -> list[dict[str, Any]]:
        """The stored events, deduplicated on `context.$message_id`, in acceptance order."""
        with self._lock:
            return list(self._events)

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """The accepted identify bodies, in acceptance order."""
        with self._lock:
            return list(self._identifies)

    @property
    def requests(self) -> list[RequestRecord]:
        """One record per request, in the order the app finished with them (not arrival order).

        A request is recorded once its answer is decided (after any latency or `delay` fault)
        or when its connection is dropped; a hang is recorded as it starts. So a slow request
        comes after quicker ones that arrived later. Not recorded: `GET /_local/events`,
        `POST /_local/reset`, and a request whose client left before sending its whole body.
        """
        with self._lock:
            return list(self._requests)

    @property
    def lenient_count(self) -> int:
        """How many messages the lenient `/_lenient/*` endpoint has counted."""
        with self._lock:
            return self._lenient_count

    def stored_ids(self) -> set[str]:
        """The `$message_id`s of the stored events."""
        with self._lock:
            return set(self._ids)

    def sent_ids(self) -> set[str]:
        """The `$message_id`s of the events accepted one at a time, on `/v1/events/track`."""
        with self._lock:
            return set(self._sent_ids)

    def reset(self) -> None:
        """Forget the stored events, identifies, request records and lenient count (not faults)."""
        with self._lock:
            self._events: list[dict[str, Any]] = []
            self._ids: set[str] = set()
            self._sent_ids: set[str] = set()
            self._identifies: list[dict[str, Any]] = []
            self._requests: list[RequestRecord] = []
            self._lenient_count = 0
            self._receipts = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI scope: `http`, or `lifespan` for servers that send it."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        request = _Request.build(scope, await _read_body(receive), parse=self._validate)
        await _send(send, await self._respond(request, receive))

    async def _respond(self, request: _Request, receive: Receive) -> _Response:
        route = _ROUTES.get(request.path)
        if route is None and request.path.startswith("/_lenient/"):
            route = _LENIENT
        if route is None:
            return self._finish(request, _error(404, f"no endpoint at {request.path}"))
        if request.method != route.method:
            allow = ((b"allow", route.method.encode()),)
            return self._finish(request, _error(405, f"use {route.method}", headers=allow))
        if not route.ingest:
            return route.handler(self, request)
        return await self._ingest(request, route, receive)

    async def _ingest(self, request: _Request, route: _Route, receive: Receive) -> _Response:
        fault = self.faults.next_fault()
        if self.faults.latency > 0:
            await anyio.sleep(self.faults.latency)
        response = await self._apply(fault, request, receive) or self._checked(request, route)
        if fault is not None and fault.kind == "lost_ack":
            raise self._dropped(request, fault)
        return self._finish(request, response, fault)

    async def _apply(
        self, fault: Fault | None, request: _Request, receive: Receive
    ) -> _Response | None:
        if fault is None or fault.kind == "lost_ack":
            return None
        if fault.kind == "status":
            after = (
                () if fault.retry_after is None else ((b"retry-after", fault.retry_after.encode()),)
            )
            return _error(fault.code, f"fault injected: {fault}", headers=after)
        if fault.kind == "delay":
            await anyio.sleep(fault.seconds)
            return None
        drop = self._dropped(request, fault)  # recorded now, so a hang shows while it lasts
        if fault.kind == "hang":
            await _wait_for_disconnect(receive)
        raise drop

    def _checked(self, request: _Request, route: _Route) -> _Response:
        if self.faults.take_auth_failure():
            return _error(401, "the API key is not valid (fault injected)")
        if route.auth and (denied := self._auth_problem(request.headers)):
            return denied
        limit = self.faults.max_body_bytes
        if limit is not None and len(request.body) > limit:
            return _error(413, f"body of {len(request.body)} bytes exceeds {limit} bytes")
        return route.handler(self, request)

    def _auth_problem(self, headers: Mapping[str, str]) -> _Response | None:
        if self._api_key is None:
            return None
        presented = headers.get("x-api-key")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if presented is None and scheme.lower() == "bearer":
            presented = token.strip()
        if not presented:
            return _error(401, "send X-API-Key or Authorization: Bearer", code="missing_api_key")
        if not hmac.compare_digest(presented.encode("latin-1"), self._api_key):
            return _error(401, "the API key is not valid")
        return None

    def _batch(self, request: _Request) -> _Response:
        if not self._validate:
            return self._store(request.data["events"])
        problem = batch_problem(request.data)
        return _invalid(problem) if problem else self._accept(request.data["events"], "events[{}]")

    def _track(self, request: _Request) -> _Response:
        message_id = _message_id(request.data)
        with self._lock:
            duplicate = isinstance(message_id, str) and message_id in self._ids
        response = self._accept([request.data], "")
        if response.status != 202:
            return response
        with self._lock:
            self._sent_ids.add(message_id)  # type: ignore[arg-type]  # accepted: a str
        return _Response(202, self._receipt(request.data, duplicate))

    def _receipt(self, event: dict[str, Any], duplicate: bool) -> dict[str, Any]:
        """The answer to one tracked event, in the shape chosen (see `RECEIPT_SHAPES`)."""
        with self._lock:
            self._receipts += 1
            number = self._receipts
        if self.receipt == "queued":
            return {"event": {"mapping_status": "pending"}, "processing": "queued"}
        if self.receipt == "durable":
            return {
                "processing": "durably_accepted",
                "delivery": {
                    "delivery_id": f"dlv_{number:08d}",
                    "disposition": "duplicate" if duplicate else "accepted",
                    "duplicate": duplicate,
                },
            }
        return {
            "event": {"id": f"evt_{number:08d}", "mapping_status": "mapped"},
            "user": {"external_user_id": event["external_user_id"]},
            "job": {"id": f"job_{number:08d}", "status": "queued"},
        }

    def _accept(self, events: list[Any], where: str) -> _Response:
        check = event_check(now=self._clock())
        for index, event in enumerate(events):
            problem = check(event)
            if problem is None and self.faults.is_poison(event):
                problem = ("", "poison event (fault injected)")
            if problem:
                return _invalid(located(where.format(index), problem))
        return self._store(events)

    def _store(self, events: list[Any]) -> _Response:
        kept = [event for event in events if not self.faults.is_rejected(event)]
        with self._lock:
            for event in kept:
                if (message_id := event["context"]["$message_id"]) not in self._ids:
                    self._ids.add(message_id)
                    self._events.append(event)
        return _Response(202, {"accepted": len(kept), "rejected": len(events) - len(kept)})

    def _identify(self, request: _Request) -> _Response:
        if problem := identify_problem(request.data):
            return _invalid(problem)
        with self._lock:
            self._identifies.append(request.data)
        return _Response(200, {"ok": True})

    def _lenient(self, request: _Request) -> _Response:
        if request.data is INVALID:
            return _invalid(("", "must be JSON (or gzip-compressed JSON)"))
        with self._lock:
            self._lenient_count += _count(request.path, request.data)
        return _Response(200, {"status": 1})

    def _local_events(self, request: _Request) -> _Response:
        payload = {"events": self.events, "identifies": self.identifies}
        return _Response(200, {**payload, "lenient_count": self.lenient_count})

    def _local_reset(self, request: _Request) -> _Response:
        self.reset()
        return _Response(200, {"ok": True})

    def _dropped(self, request: _Request, fault: Fault) -> DropConnection:
        self._record(request, None, fault)
        return DropConnection(str(fault))

    def _finish(
        self, request: _Request, response: _Response, fault: Fault | None = None
    ) -> _Response:
        self._record(request, response, fault)
        return response

    def _record(self, request: _Request, response: _Response | None, fault: Fault | None) -> None:
        status = None if response is None else response.status
        count = _count(request.path, request.data)
        record = RequestRecord(
            request.method, request.path, status, count, len(request.body), fault
        )
        with self._lock:
            self._requests.append(record)
        if self._echo:
            _log_echo(record, request, response)


def create_app(
    *,
    api_key: str | None = None,
    clock: Callable[[], float] | None = None,
    faults: Faults | None = None,
    echo: bool = False,
    validate: bool = True,
    receipt: ReceiptShape = "event",
) -> WhisperrApp:
    """Build a local Whisperr ingestion app.

    Args:
        api_key: When set, every `/v1/*` request must present it (`X-API-Key` or Bearer).
        clock: Seconds since the epoch, for the `occurred_at` window; defaults to `time.time`.
        faults: The fault knobs; a fresh, inactive `Faults` by default.
        echo: Log each request in readable form to the `whisperr.server` logger at INFO.
        validate: False skips the field checks of batches and stores only each event's
            `$message_id` (still deduplicated), so that a benchmark measures the client and not
            this server: parsing and checking cost it about 9 us an event.
        receipt: The shape of the `202` answer to `POST /v1/events/track`, one of the three the
            API's sources document, so that code reading receipts can be tested against each:
            `"event"` (`{"event": {"id", "mapping_status"}, "user": {...}, "job": {...}}`),
            `"queued"` (`{"event": {"mapping_status": "pending"}, "processing": "queued"}`) or
            `"durable"` (`{"processing": "durably_accepted", "delivery": {"delivery_id",
            "disposition", "duplicate"}}`, `duplicate` true for a `$message_id` stored before).

    Returns:
        The ASGI app; serve it with `LocalServer`, `serve`, or `httpx.ASGITransport`.
    """
    faults = Faults() if faults is None else faults
    return WhisperrApp(
        api_key=api_key,
        clock=clock or time.time,
        faults=faults,
        echo=echo,
        validate=validate,
        receipt=receipt,
    )


def _message_id(event: Any) -> object:
    context = event.get("context") if isinstance(event, dict) else None
    return context.get("$message_id") if isinstance(context, dict) else None


_ROUTES = {
    "/v1/events/batch": _Route("POST", WhisperrApp._batch),
    "/v1/events/track": _Route("POST", WhisperrApp._track),
    "/v1/identify": _Route("POST", WhisperrApp._identify),
    "/_local/events": _Route("GET", WhisperrApp._local_events, ingest=False, auth=False),
    "/_local/reset": _Route("POST", WhisperrApp._local_reset, ingest=False, auth=False),
}
_LENIENT = _Route("POST", WhisperrApp._lenient, auth=False)


def _listed_events(path: str, data: Any) -> list[Any]:
    if path == "/v1/events/track":
        return [] if data is INVALID else [data]
    events = data.get("events") if path == "/v1/events/batch" and isinstance(data, dict) else None
    return events if isinstance(events, list) else []


def _count(path: str, data: Any) -> int:
    """The number of messages a body carries, as recorded (and counted by `/_lenient/*`)."""
    if not path.startswith("/_lenient/") or data is INVALID:
        return len(_listed_events(path, data))
    if isinstance(data, dict):
        data = data.get("batch", data.get("events", data))
    return len(data) if isinstance(data, list) else 1


def _log_echo(record: RequestRecord, request: _Request, response: _Response | None) -> None:
    error: str | None = None
    if response is not None and response.status >= 400:
        error = response.payload["error"]["message"]
    events = _listed_events(request.path, request.data)
    for line in echo_lines(record, request.data, events, error):
        logger.info("%s", line)


def _decode(body: bytes, encoding: str) -> Any:
    try:
        if encoding.strip().lower() == "gzip":
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(body, _MAX_INFLATED_BYTES)
            if inflater.unconsumed_tail:
                return INVALID
        return orjson.loads(body)
    except (orjson.JSONDecodeError, zlib.error):
        return INVALID


def _error(status: int, message: str, *, code: str = "", headers: Headers = ()) -> _Response:
    code = code or _ERROR_CODES.get(status, "server_error" if status >= 500 else "request_failed")
    body = {"error": {"code": code, "message": message, "request_id": str(uuid.uuid4())}}
    return _Response(status, body, headers)


def _invalid(problem: Problem | None) -> _Response:
    where, rule = problem or ("", "invalid")
    return _error(400, f"{where or 'body'}: {rule}", code="invalid_request")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise DropConnection("the client went away mid-request")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, response: _Response) -> None:
    body = orjson.dumps(response.payload)
    length = str(len(body)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    start = {"type": "http.response.start", "status": response.status}
    await send({**start, "headers": [*headers, *response.headers]})
    await send({"type": "http.response.body", "body": body})


async def _wait_for_disconnect(receive: Receive) -> None:
    with anyio.move_on_after(_HANG_LIMIT_SECONDS):
        while (await receive())["type"] != "http.disconnect":
            pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})
