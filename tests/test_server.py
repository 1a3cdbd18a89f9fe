"""Tests for the bundled local ingestion server: wire validation, read-back, faults, HTTP, CLI."""

from __future__ import annotations

import gzip
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import httpx
import orjson
import pytest

import whisperr.server
from whisperr.server import (
    DropConnection,
    Fault,
    Faults,
    LocalServer,
    RequestRecord,
    WhisperrApp,
    create_app,
)
from whisperr.server.__main__ import main
from whisperr.server._faults import parse_mix

NOW = 1_781_438_400.0  # 2026-06-14T12:00:00Z, the injected server clock
STAMP = "2026-06-14T12:00:00.000Z"
KEY = "wrk_test_0123456789abcdef"
TIMEOUT = httpx.Timeout(5.0)
MISSING = object()  # marks a field a test case removes


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def event(**changes: Any) -> dict[str, Any]:
    """A valid event, with `changes` applied (a MISSING value removes the field)."""
    base = {
        "external_user_id": "user_8842",
        "event_type": "payment_failed",
        "occurred_at": STAMP,
        "properties": {"amount_cents": 4900},
        "context": {"$message_id": str(uuid.uuid4())},
    }
    merged = {**base, **changes}
    return {key: value for key, value in merged.items() if value is not MISSING}


def make_app(**kwargs: Any) -> WhisperrApp:
    return create_app(clock=lambda: NOW, **kwargs)


async def call(
    app: WhisperrApp, path: str, body: Any = None, *, method: str = "POST", **kwargs: Any
) -> httpx.Response:
    """Send one request to `app` in-process through httpx.ASGITransport."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://whisperr.test", timeout=TIMEOUT
    ) as client:
        return await client.request(method, path, json=body, **kwargs)


def assert_invalid(response: httpx.Response, message_start: str) -> None:
    """A 400 with the error envelope whose message starts with `message_start`."""
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(message_start), error["message"]
    uuid.UUID(error["request_id"])


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(make_app()) as running:
        yield running


@pytest.fixture
def client(server: LocalServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


def test_public_names_are_sorted_and_complete() -> None:
    """The package exports exactly its small public surface, in sorted order."""
    assert whisperr.server.__all__ == sorted(whisperr.server.__all__)
    assert set(whisperr.server.__all__) == {
        "ReceiptShape",
        "DropConnection",
        "Fault",
        "Faults",
        "LocalServer",
        "RequestRecord",
        "WhisperrApp",
        "create_app",
        "serve",
    }


@pytest.mark.anyio
class TestBatch:
    async def test_valid_batch_is_accepted_and_read_back(self) -> None:
        """A valid batch is answered 202 and its events are stored in order."""
        app, events = make_app(), [event(), event(event_type="plan_upgraded")]
        response = await call(app, "/v1/events/batch", {"events": events})
        assert response.status_code == 202
        assert response.json() == {"accepted": 2, "rejected": 0}
        assert app.events == events
        assert app.stored_ids() == {e["context"]["$message_id"] for e in events}

    async def test_request_is_recorded(self) -> None:
        """Each ingest request leaves a record of its method, path, status and size."""
        app = make_app()
        response = await call(app, "/v1/events/batch", {"events": [event(), event()]})
        size = len(response.request.content)
        assert app.requests == [RequestRecord("POST", "/v1/events/batch", 202, 2, size, None)]

    async def test_repeated_message_id_is_accepted_but_stored_once(self) -> None:
        """Dedup on $message_id: repeats count as accepted, within and across batches."""
        app, first = make_app(), event()
        response = await call(app, "/v1/events/batch", {"events": [first, first]})
        again = await call(app, "/v1/events/batch", {"events": [first, event()]})
        assert response.json() == {"accepted": 2, "rejected": 0}
        assert again.json() == {"accepted": 2, "rejected": 0}
        assert [e["context"]["$message_id"] for e in app.events].count(
            first["context"]["$message_id"]
        ) == 1
        assert len(app.events) == 2

    async def test_track_accepts_one_event(self) -> None:
        """The single-event endpoint answers 202 with a receipt (its default shape)."""
        app, one = make_app(), event()
        response = await call(app, "/v1/events/track", one)
        assert response.status_code == 202
        assert response.json() == {
            "event": {"id": "evt_00000001", "mapping_status": "mapped"},
            "user": {"external_user_id": one["external_user_id"]},
            "job": {"id": "job_00000001", "status": "queued"},
        }
        assert app.events == [one]
        assert app.sent_ids() == {one["context"]["$message_id"]}

    def test_an_unknown_receipt_shape_is_refused(self) -> None:
        with pytest.raises(ValueError, match="receipt must be one of event, queued, durable"):
            create_app(receipt="weird")  # type: ignore[arg-type]

    async def test_gzip_body_is_accepted(self) -> None:
        """A gzip-compressed batch (the SDK's opt-in) is decoded; the record keeps wire size."""
        app, packed = make_app(), gzip.compress(orjson.dumps({"events": [event()]}))
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        response = await call(app, "/v1/events/batch", content=packed, headers=headers)
        assert response.status_code == 202
        assert app.requests[0].body_bytes == len(packed)

    async def test_five_hundred_events_are_accepted(self) -> None:
        """The largest allowed batch goes through."""
        app = make_app()
        response = await call(app, "/v1/events/batch", {"events": [event() for _ in range(500)]})
        assert response.json() == {"accepted": 500, "rejected": 0}

    async def test_reset_forgets_everything_stored(self) -> None:
        """reset() empties events, identifies, request records and the lenient count."""
        app = make_app()
        await call(app, "/v1/events/batch", {"events": [event()]})
        await call(app, "/v1/identify", {"external_user_id": "u"})
        await call(app, "/_lenient/v1/batch", {"batch": [1]})
        app.reset()
        assert (app.events, app.identifies, app.requests, app.lenient_count) == ([], [], [], 0)


EVENT_CASES = [
    ({"external_user_id": MISSING}, "external_user_id: required field missing"),
    ({"external_user_id": ""}, "external_user_id: must be a non-empty string"),
    ({"external_user_id": 42}, "external_user_id: must be a non-empty string"),
    ({"event_type": MISSING}, "event_type: required field missing"),
    ({"event_type": "PaymentFailed"}, "event_type: must be lowercase snake_case"),
    ({"event_type": "payment-failed"}, "event_type: must be lowercase snake_case"),
    ({"event_type": "payment__failed"}, "event_type: must be lowercase snake_case"),
    ({"event_type": "_payment"}, "event_type: must be lowercase snake_case"),
    ({"event_type": ""}, "event_type: must be lowercase snake_case"),
    ({"occurred_at": MISSING}, "occurred_at: required field missing"),
    ({"occurred_at": "2026-06-14T12:00:00Z"}, "occurred_at: must be RFC3339 UTC"),
    ({"occurred_at": "2026-06-14T12:00:00.000000Z"}, "occurred_at: must be RFC3339 UTC"),
    ({"occurred_at": "2026-06-14T12:00:00.000+00:00"}, "occurred_at: must be RFC3339 UTC"),
    ({"occurred_at": "2026-06-14 12:00:00.000Z"}, "occurred_at: must be RFC3339 UTC"),
    ({"occurred_at": 1781438400}, "occurred_at: must be RFC3339 UTC"),
    ({"occurred_at": "2026-02-30T12:00:00.000Z"}, "occurred_at: is not a valid date"),
    ({"occurred_at": "2026-06-14T12:05:00.001Z"}, "occurred_at: is more than 5 minutes ahead"),
    ({"occurred_at": "2026-05-15T11:59:59.999Z"}, "occurred_at: is more than 30 days in the"),
    ({"properties": MISSING}, "properties: required field missing"),
    ({"properties": []}, "properties: must be a JSON object"),
    ({"context": MISSING}, "context: required field missing"),
    ({"context": []}, "context: must be a JSON object"),
    ({"context": {}}, "context.$message_id: must be a non-empty string"),
    ({"context": {"$message_id": ""}}, "context.$message_id: must be a non-empty string"),
    ({"context": {"$message_id": 7}}, "context.$message_id: must be a non-empty string"),
    ({"timestamp": STAMP}, "timestamp: unknown field"),
    ({"user": {"type": "email"}}, "user.type: unknown field"),
    ({"user": {"preferred_channel": "fax"}}, "user.preferred_channel: must be one of"),
    ({"user": {"channels": [{"channel": "sms"}]}}, "user.channels[0].address: required"),
]


@pytest.mark.anyio
class TestEventValidation:
    @pytest.mark.parametrize(("changes", "message"), EVENT_CASES)
    async def test_invalid_event_fails_the_batch(
        self, changes: dict[str, Any], message: str
    ) -> None:
        """Each rule of WIRE.md section 2 answers 400 naming the event index and the field."""
        app = make_app()
        response = await call(app, "/v1/events/batch", {"events": [event(**changes)]})
        assert_invalid(response, f"events[0].{message}")
        assert app.events == []

    @pytest.mark.parametrize(
        "changes",
        [
            {"occurred_at": "2026-06-14T12:05:00.000Z"},  # exactly 5 minutes ahead
            {"occurred_at": "2026-05-15T12:00:00.000Z"},  # exactly 30 days back
            {"properties": {}, "context": {"$message_id": "m", "sdk_name": "x"}},
            {"user": {"preferred_channel": "sms", "channels": []}},
            {"event_type": "a1_b2"},
        ],
    )
    async def test_edge_of_each_rule_is_accepted(self, changes: dict[str, Any]) -> None:
        """Values right at the limits of the rules are valid."""
        response = await call(make_app(), "/v1/events/batch", {"events": [event(**changes)]})
        assert response.status_code == 202

    async def test_message_names_the_failing_index_and_nothing_is_stored(self) -> None:
        """One bad event fails its whole batch, and the message points at it."""
        app = make_app()
        events = [event(), event(), event(event_type="Bad")]
        assert_invalid(await call(app, "/v1/events/batch", {"events": events}), "events[2].")
        assert app.events == []

    async def test_track_message_names_the_field(self) -> None:
        """The single-event endpoint validates the same rules, without an index."""
        response = await call(make_app(), "/v1/events/track", event(occurred_at="yesterday"))
        assert_invalid(response, "occurred_at: must be RFC3339 UTC")

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            (b"{not json", "body: must be valid JSON"),
            (b"[]", "body: must be a JSON object"),
            (b"{}", "events: required field missing"),
            (b'{"events": {}}', "events: must be a list of 1 to 500 events"),
            (b'{"events": []}', "events: must be a list of 1 to 500 events"),
            (orjson.dumps({"events": [event()] * 501}), "events: must be a list of 1 to 500"),
            (orjson.dumps({"events": [event()], "sent_at": STAMP}), "sent_at: unknown field"),
            (b'{"events": [7]}', "events[0]: must be a JSON object"),
        ],
    )
    async def test_request_shape_failures(self, content: bytes, message: str) -> None:
        """Bad JSON, a non-object, a missing or wrong-sized `events` list: 400 invalid_request."""
        response = await call(make_app(), "/v1/events/batch", content=content)
        assert_invalid(response, message)


IDENTIFY_CASES = [
    ({}, "external_user_id: required field missing"),
    ({"external_user_id": ""}, "external_user_id: must be a non-empty string"),
    ({"traits": []}, "traits: must be a JSON object"),
    ({"traits": {"blob": "x" * 51_200}}, "traits: must be at most 50 KB"),
    ({"preferred_channel": "fax"}, "preferred_channel: must be one of email, sms, push"),
    ({"channels": "email"}, "channels: must be a list of at most 10"),
    ({"channels": [{"channel": "push", "address": "t", "opted_in": True}] * 11}, "channels: must"),
    ({"channels": [{"type": "email", "address": "a", "opted_in": True}]}, "channels[0].type: unk"),
    ({"channels": [{"channel": "fax", "address": "a", "opted_in": True}]}, "channels[0].channel"),
    ({"channels": [{"channel": "sms", "address": 5, "opted_in": True}]}, "channels[0].address"),
    ({"channels": [{"channel": "sms", "address": "+1"}]}, "channels[0].opted_in: required"),
    ({"channels": [{"channel": "sms", "address": "+1", "opted_in": 1}]}, "channels[0].opted_in"),
    (
        {"channels": [{"channel": "sms", "address": "+1", "opted_in": True, "verified": "no"}]},
        "channels[0].verified: must be true or false",
    ),
    ({"email": "ada@example.com"}, "email: unknown field"),
]


@pytest.mark.anyio
class TestIdentify:
    @pytest.mark.parametrize(
        "body",
        [
            {"external_user_id": "user_8842"},
            {
                "external_user_id": "user_8842",
                "traits": {"plan": "pro"},
                "preferred_channel": "email",
                "channels": [
                    {"channel": "email", "address": "ada@example.com", "opted_in": True},
                    {"channel": "push", "address": "tok", "opted_in": False, "verified": True},
                ],
            },
        ],
    )
    async def test_valid_identify_is_stored(self, body: dict[str, Any]) -> None:
        """A bare or a full identify answers 200 {"ok": true} and is read back."""
        app = make_app()
        response = await call(app, "/v1/identify", body)
        assert (response.status_code, response.json()) == (200, {"ok": True})
        assert app.identifies == [body]

    @pytest.mark.parametrize(("changes", "message"), IDENTIFY_CASES)
    async def test_invalid_identify(self, changes: dict[str, Any], message: str) -> None:
        """Each rule of WIRE.md section 3 answers 400 naming the field."""
        body = {"external_user_id": "user_8842", **changes} if changes else {}
        app = make_app()
        assert_invalid(await call(app, "/v1/identify", body), message)
        assert app.identifies == []


@pytest.mark.anyio
class TestAuth:
    async def test_missing_key(self) -> None:
        """No key at all: 401 missing_api_key."""
        response = await call(make_app(api_key=KEY), "/v1/events/batch", {"events": [event()]})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "missing_api_key"

    @pytest.mark.parametrize(
        "headers", [{"X-API-Key": "wrk_wrong"}, {"Authorization": "Bearer wrk_wrong"}]
    )
    async def test_wrong_key(self, headers: dict[str, str]) -> None:
        """A wrong key in either header: 401 invalid_api_key, and nothing is stored."""
        app = make_app(api_key=KEY)
        response = await call(app, "/v1/events/batch", {"events": [event()]}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "wrk_wrong" not in response.text
        assert app.events == []

    @pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}])
    async def test_right_key_in_either_header(self, headers: dict[str, str]) -> None:
        """The right key in X-API-Key or as a Bearer token is accepted."""
        app = make_app(api_key=KEY)
        batch = await call(app, "/v1/events/batch", {"events": [event()]}, headers=headers)
        identify = await call(app, "/v1/identify", {"external_user_id": "u"}, headers=headers)
        assert (batch.status_code, identify.status_code) == (202, 200)

    async def test_key_never_appears_in_responses(self) -> None:
        """No answer, header or repr ever carries the configured key."""
        app = make_app(api_key=KEY)
        responses = [
            await call(app, "/v1/events/batch", {"events": [event()]}, headers=headers)
            for headers in ({}, {"X-API-Key": "nope"}, {"X-API-Key": KEY})
        ]
        responses.append(await call(app, "/_local/events", method="GET"))
        for response in responses:
            assert KEY not in response.text
            assert KEY not in str(response.headers)
        assert KEY not in repr(app)

    async def test_read_back_and_lenient_need_no_key(self) -> None:
        """/_local/* and /_lenient/* are open even when a key is configured."""
        app = make_app(api_key=KEY)
        assert (await call(app, "/_local/events", method="GET")).status_code == 200
        assert (await call(app, "/_lenient/v1/batch", {"batch": []})).status_code == 200


@pytest.mark.anyio
class TestRouting:
    async def test_unknown_path_is_404_with_envelope(self) -> None:
        """An unknown path answers 404 with the error envelope."""
        response = await call(make_app(), "/v2/events", {"events": []})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"

    async def test_wrong_method_is_405(self) -> None:
        """A known path with the wrong method answers 405 and names the allowed one."""
        response = await call(make_app(), "/v1/events/batch", method="GET")
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"]["code"] == "method_not_allowed"

    async def test_lifespan_is_acknowledged(self) -> None:
        """Servers that send lifespan events (uvicorn) get startup and shutdown completed."""
        incoming = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]
        sent: list[Any] = []

        async def receive() -> Any:
            return incoming.pop()

        async def send(message: Any) -> None:
            sent.append(message["type"])

        await make_app()({"type": "lifespan"}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    async def test_http_read_back(self) -> None:
        """GET /_local/events returns stored events, identifies and the lenient count."""
        app, one = make_app(), event()
        await call(app, "/v1/events/track", one)
        await call(app, "/v1/identify", {"external_user_id": "u"})
        response = await call(app, "/_local/events", method="GET")
        expected = {"events": [one], "identifies": [{"external_user_id": "u"}]}
        assert response.json() == {**expected, "lenient_count": 0}


@pytest.mark.anyio
class TestLenient:
    @pytest.mark.parametrize(
        ("body", "count"),
        [
            ({"batch": [{"type": "track"}] * 3}, 3),
            ({"events": [1, 2]}, 2),
            ([1, 2, 3, 4], 4),
            ({"type": "track", "event": "x"}, 1),
            ("just a string", 1),
        ],
    )
    async def test_counts_messages(self, body: Any, count: int) -> None:
        """Any JSON is accepted and its messages are counted."""
        app = make_app()
        response = await call(app, "/_lenient/v1/batch", body)
        assert (response.status_code, response.json()) == (200, {"status": 1})
        assert app.lenient_count == count

    async def test_counts_gzip_bodies_and_exposes_the_count(self) -> None:
        """A gzip-compressed body is counted; the total shows in /_local/events."""
        app = make_app()
        packed = gzip.compress(orjson.dumps({"batch": [1, 2, 3]}))
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        await call(app, "/_lenient/segment/batch", content=packed, headers=headers)
        await call(app, "/_lenient/other", [1])
        assert (await call(app, "/_local/events", method="GET")).json()["lenient_count"] == 4

    async def test_rejects_non_json(self) -> None:
        """A body that is not JSON answers 400."""
        assert_invalid(await call(make_app(), "/_lenient/x", content=b"\x00"), "body: must be")


class TestFaultKnobs:
    def test_script_is_consumed_in_order_then_normal(self) -> None:
        """Scripted faults apply one per request, then the server behaves normally."""
        faults = Faults()
        faults.script([Fault.status(503), None, Fault.close()])
        drawn = [faults.next_fault() for _ in range(5)]
        assert drawn == [Fault.status(503), None, Fault.close(), None, None]

    def test_seeded_mix_is_deterministic(self) -> None:
        """The same seed picks the same faults; probabilities are roughly respected."""
        weights = {Fault.status(503): 0.3, Fault.close(): 0.1}
        runs = []
        for _ in range(2):
            faults = Faults()
            faults.mix(weights, seed=42)
            runs.append([faults.next_fault() for _ in range(1000)])
        assert runs[0] == runs[1]
        assert 200 < runs[0].count(Fault.status(503)) < 400
        assert 50 < runs[0].count(Fault.close()) < 150

    def test_script_wins_over_mix(self) -> None:
        """A script runs before the mix takes over."""
        faults = Faults()
        faults.mix({Fault.hang(): 1.0}, seed=1)
        faults.script([Fault.lost_ack()])
        assert [faults.next_fault(), faults.next_fault()] == [Fault.lost_ack(), Fault.hang()]

    @pytest.mark.parametrize(
        "weights", [{Fault.close(): 0.7, Fault.hang(): 0.4}, {Fault.hang(): -1}]
    )
    def test_mix_rejects_bad_probabilities(self, weights: dict[Fault, float]) -> None:
        """Probabilities must be non-negative and sum to at most 1."""
        with pytest.raises(ValueError, match="probabilities"):
            Faults().mix(weights)

    def test_clear_restores_normal_behaviour(self) -> None:
        """clear() drops the script, the mix, forced auth failures and the knobs."""
        faults = Faults(max_body_bytes=1, poison="x", latency=1.0)
        faults.script([Fault.close()])
        faults.mix({Fault.close(): 1.0})
        faults.auth_fail_for(3)
        faults.clear()
        assert faults.next_fault() is None
        assert not faults.take_auth_failure()
        assert (faults.max_body_bytes, faults.poison, faults.latency) == (None, None, 0.0)

    @pytest.mark.parametrize(
        ("text", "fault"),
        [
            ("503", Fault.status(503)),
            ("429:2", Fault.status(429, retry_after="2")),
            ("close", Fault.close()),
            ("lost_ack", Fault.lost_ack()),
            ("hang", Fault.hang()),
            ("delay:0.5", Fault.delay(0.5)),
        ],
    )
    def test_parse(self, text: str, fault: Fault) -> None:
        """The command-line spelling of each fault kind."""
        assert Fault.parse(text) == fault

    @pytest.mark.parametrize("text", ["200", "boom", "close:1", "delay:-1"])
    def test_parse_rejects_nonsense(self, text: str) -> None:
        """Unknown kinds and out-of-range values are refused."""
        with pytest.raises(ValueError):  # noqa: PT011 (messages differ per case)
            Fault.parse(text)

    def test_parse_mix(self) -> None:
        """The --fault-mix syntax maps faults to probabilities."""
        mix = parse_mix("503=0.2, 429:1=0.1,close=0.1,lost_ack=0.1")
        assert mix == {
            Fault.status(503): 0.2,
            Fault.status(429, retry_after=1): 0.1,
            Fault.close(): 0.1,
            Fault.lost_ack(): 0.1,
        }
        with pytest.raises(ValueError, match="FAULT=PROBABILITY"):
            parse_mix("503")


@pytest.mark.anyio
class TestFaultsInProcess:
    @pytest.mark.parametrize(
        ("fault", "retry_after"),
        [
            (Fault.status(503, retry_after=1), "1"),
            (
                Fault.status(429, retry_after=formatdate(NOW + 5, usegmt=True)),
                formatdate(NOW + 5, usegmt=True),
            ),
            (Fault.status(500), None),
        ],
    )
    async def test_status_fault(self, fault: Fault, retry_after: str | None) -> None:
        """A status fault answers its code with the envelope and Retry-After, storing nothing."""
        app = make_app()
        app.faults.script([fault])
        response = await call(app, "/v1/events/batch", {"events": [event()]})
        assert response.status_code == fault.code
        assert response.headers.get("retry-after") == retry_after
        assert "error" in response.json()
        assert app.events == []
        assert app.requests[0].fault == fault

    async def test_auth_fail_for_then_recover(self) -> None:
        """auth_fail_for(2) answers 401 twice, then requests succeed again."""
        app = make_app()
        app.faults.auth_fail_for(2)
        statuses = [
            (await call(app, "/v1/events/batch", {"events": [event()]})).status_code
            for _ in range(3)
        ]
        assert statuses == [401, 401, 202]
        assert len(app.events) == 1

    async def test_body_above_max_body_bytes_is_413(self) -> None:
        """Bodies above max_body_bytes answer 413; bodies at the limit pass."""
        app, body = make_app(), {"events": [event()]}
        app.faults.max_body_bytes = len(orjson.dumps(body))
        assert (await call(app, "/v1/events/batch", content=orjson.dumps(body))).status_code == 202
        app.faults.max_body_bytes -= 1
        response = await call(app, "/v1/events/batch", content=orjson.dumps(body))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

    @pytest.mark.parametrize("poison", ["user_deleted", lambda e: e["properties"].get("bad")])
    async def test_poison_event_fails_the_batch(self, poison: Any) -> None:
        """A batch holding a poison event answers 400 naming it; nothing is stored."""
        app = make_app()
        app.faults.poison = poison
        events = [event(), event(event_type="user_deleted", properties={"bad": True})]
        assert_invalid(await call(app, "/v1/events/batch", {"events": events}), "events[1]:")
        assert app.events == []

    async def test_reject_counts_events_as_rejected(self) -> None:
        """Rejected events are counted in `rejected` and not stored; the rest are."""
        app = make_app()
        app.faults.reject = lambda e: e["event_type"] == "spam_sent"
        events = [event(), event(event_type="spam_sent"), event()]
        response = await call(app, "/v1/events/batch", {"events": events})
        assert (response.status_code, response.json()) == (202, {"accepted": 2, "rejected": 1})
        assert app.events == [events[0], events[2]]

    @pytest.mark.parametrize("fault", [Fault.close(), Fault.lost_ack()])
    async def test_connection_faults_surface_as_drop_connection(self, fault: Fault) -> None:
        """Without the bundled server, a connection fault reaches the caller as DropConnection."""
        app = make_app()
        app.faults.script([fault])
        with pytest.raises(DropConnection):
            await call(app, "/v1/events/batch", {"events": [event()]})
        assert app.requests[0].status is None

    async def test_echo_logs_readable_lines(self, caplog: pytest.LogCaptureFixture) -> None:
        """echo=True logs one line per request, plus one per event for small batches."""
        app = make_app(echo=True, api_key=KEY)
        headers = {"X-API-Key": KEY}
        with caplog.at_level(logging.INFO, logger="whisperr.server"):
            await call(app, "/v1/events/batch", {"events": [event(), event()]}, headers=headers)
            big = {"events": [event(external_user_id=f"u{i}") for i in range(20)]}
            await call(app, "/v1/events/batch", big, headers=headers)
        lines = [record.getMessage() for record in caplog.records]
        assert lines[0] == (
            "202 POST /v1/events/batch  2 events"
            "  (user_8842 payment_failed, user_8842 payment_failed)"
        )
        assert lines[1].startswith("    user_8842 payment_failed  ")
        assert lines[3] == (
            "202 POST /v1/events/batch  20 events  (u0 payment_failed, u1 payment_failed, ...)"
        )
        assert len(lines) == 4
        assert all(KEY not in line for line in lines)


class TestLocalServer:
    def test_round_trip_and_http_read_back(self, server: LocalServer, client: httpx.Client) -> None:
        """Over a real socket on 127.0.0.1: a batch is stored and readable over HTTP."""
        assert server.url.startswith("http://127.0.0.1:")
        events = [event(), event()]
        for _ in range(3):  # several requests on one keep-alive connection
            assert client.post("/v1/events/batch", json={"events": events}).status_code == 202
        assert client.get("/_local/events").json()["events"] == events
        assert server.app.events == events

    def test_close_fault_is_a_transport_error_and_stores_nothing(
        self, server: LocalServer, client: httpx.Client
    ) -> None:
        """`close` hangs up without answering; the next request is served normally."""
        server.app.faults.script([Fault.close()])
        with pytest.raises(httpx.TransportError):
            client.post("/v1/events/batch", json={"events": [event()]})
        assert server.app.events == []
        assert client.post("/v1/events/batch", json={"events": [event()]}).status_code == 202

    def test_lost_ack_stores_then_hangs_up(self, server: LocalServer, client: httpx.Client) -> None:
        """`lost_ack` stores the batch but never answers; a retry is deduplicated."""
        server.app.faults.script([Fault.lost_ack()])
        events = [event(), event()]
        with pytest.raises(httpx.TransportError):
            client.post("/v1/events/batch", json={"events": events})
        assert server.app.events == events
        retry = client.post("/v1/events/batch", json={"events": events})
        assert retry.json() == {"accepted": 2, "rejected": 0}
        assert server.app.events == events
        assert [r.status for r in server.app.requests] == [None, 202]

    def test_hang_lasts_until_the_client_gives_up(
        self, server: LocalServer, client: httpx.Client
    ) -> None:
        """`hang` never answers: the client times out, and the server keeps serving."""
        server.app.faults.script([Fault.hang()])
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/events/track", json=event(), timeout=httpx.Timeout(5.0, read=0.2))
        assert client.post("/v1/events/track", json=event()).status_code == 202
        assert server.app.requests[0].fault == Fault.hang()

    def test_delay_then_answer(self, server: LocalServer, client: httpx.Client) -> None:
        """`delay` answers normally after waiting."""
        server.app.faults.script([Fault.delay(0.01)])
        assert client.post("/v1/events/track", json=event()).status_code == 202
        assert server.app.requests[0] == RequestRecord(
            "POST", "/v1/events/track", 202, 1, server.app.requests[0].body_bytes, Fault.delay(0.01)
        )

    def test_status_fault_over_the_socket(self, server: LocalServer, client: httpx.Client) -> None:
        """A scripted 503 with Retry-After arrives intact over HTTP."""
        server.app.faults.script([Fault.status(503, retry_after=1)])
        response = client.post("/v1/events/batch", json={"events": [event()]})
        assert (response.status_code, response.headers["retry-after"]) == (503, "1")

    def test_seeded_mix_replays_identically(self) -> None:
        """Two servers with the same seeded mix give the same sequence of outcomes."""
        outcomes = []
        for _ in range(2):
            with LocalServer(make_app()) as running, httpx.Client(timeout=TIMEOUT) as http:
                running.app.faults.mix({Fault.status(503): 0.3, Fault.close(): 0.2}, seed=7)
                outcomes.append([_outcome(http, running.url) for _ in range(30)])
        assert outcomes[0] == outcomes[1]
        assert {"dropped", 503, 202} == set(outcomes[0])

    def test_oversized_body_is_refused_by_the_server(
        self, server: LocalServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Above the server's own body limit the app is not called: 413 and close."""
        monkeypatch.setattr("whisperr.server._http.MAX_BODY_BYTES", 1_000)
        response = client.post("/v1/events/batch", json={"events": [event()] * 20})
        assert response.status_code == 413
        assert server.app.requests == []

    def test_malformed_http_gets_400(self, server: LocalServer) -> None:
        """Bytes that are not HTTP get a plain 400 and a closed connection."""
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert raw.recv(1024).startswith(b"HTTP/1.1 400")

    def test_stop_is_bounded_with_a_hung_request(self) -> None:
        """Leaving the context closes connections that are still hanging."""
        with LocalServer(make_app()) as running:
            running.app.faults.script([None, Fault.hang()])
            host, port = running.url.removeprefix("http://").split(":")
            raw = socket.create_connection((host, int(port)), timeout=5)
            assert _raw_track(raw).startswith(b"HTTP/1.1 202")  # the connection is being served
            _raw_track(raw, read=False)
            url = running.url
        with raw:
            assert raw.recv(1024) == b""  # closed without an answer
        with pytest.raises(RuntimeError):
            _ = running.url
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/_local/events", timeout=TIMEOUT)

    def test_cannot_start_twice(self, server: LocalServer) -> None:
        """A LocalServer runs once."""
        with pytest.raises(RuntimeError, match="once"):
            server.start()


def _raw_track(raw: socket.socket, *, read: bool = True) -> bytes:
    body = orjson.dumps(event())
    head = f"POST /v1/events/track HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    raw.sendall(head.encode() + body)
    answer = b""
    while read and not answer.endswith(b"}"):
        answer += raw.recv(4096)
    return answer


def _wall_clock_stamp() -> str:
    """Now, as WIRE.md wants it (the subprocess serves on the real clock)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _outcome(http: httpx.Client, url: str) -> int | str:
    try:
        return http.post(f"{url}/v1/events/batch", json={"events": [event()]}).status_code
    except httpx.TransportError:
        return "dropped"


class TestCommandLine:
    def test_bad_fault_mix_is_a_usage_error(self) -> None:
        """An unparseable --fault-mix exits with argparse's usage error."""
        with pytest.raises(SystemExit) as exited:
            main(["--fault-mix", "boom=0.5"])
        assert exited.value.code == 2

    @pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics differ on Windows")
    def test_runs_echoes_and_stops_on_sigterm(self) -> None:
        """`python -m whisperr.server` prints its URL and each batch, and exits 0 on SIGTERM."""
        command = [sys.executable, "-m", "whisperr.server", "--port", "0", "--api-key", KEY]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
            try:
                assert process.stdout is not None
                banner = process.stdout.readline().split()
                url = next(word for word in banner if word.startswith("http://"))
                assert url.startswith("http://127.0.0.1:")
                headers = {"X-API-Key": KEY}
                body = {"events": [event(occurred_at=_wall_clock_stamp())]}
                response = httpx.post(f"{url}/v1/events/batch", json=body, headers=headers)
                assert response.status_code == 202
                assert process.stdout.readline().startswith("202 POST /v1/events/batch  1 event  (")
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=10) == 0
            finally:
                process.kill()


@pytest.mark.anyio
async def test_benchmark_mode_counts_ids_without_validating() -> None:
    """validate=False stores each batch event's $message_id once, whatever else the event holds."""
    app = create_app(validate=False)
    body = b'{"events":[{"context":{"$message_id":"a"}},{"x":1,"context":{"$message_id": "b"}},'
    body += b'{"context":{"$message_id":"a"}}]}'
    response = await call(app, "/v1/events/batch", content=body)
    assert response.status_code == 202
    assert [e["context"]["$message_id"] for e in app.events] == ["a", "b"]
