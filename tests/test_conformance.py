"""The official SDKs' shared conformance vectors, run against this SDK's public API."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import whisperr

from .conftest import API_KEY, Api, Clock, Sleeps

pytestmark = pytest.mark.anyio

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "spec" / "conformance"
_DIR = _SHARED if (_SHARED / "wire.json").exists() else Path(__file__).parent / "conformance"
WIRE = json.loads((_DIR / "wire.json").read_text())["cases"]
BEHAVIOR = json.loads((_DIR / "behavior.json").read_text())["cases"]
RFC3339_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
STATUS_CLASSES = {"ok": range(200, 300), "auth": (401, 403), "retry": (429, *range(500, 600))}


def _snake(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), key)


def _channel(spec: dict[str, Any]) -> dict[str, Any]:
    return {_snake(k): v for k, v in spec.items()}


def _run_scenario(client: whisperr.AsyncClient, op: str, scenario: dict[str, Any]) -> None:
    if op == "track":
        client.track(scenario["externalUserId"], scenario["eventType"], scenario.get("properties"))
        return
    client.identify(
        scenario["externalUserId"],
        scenario.get("traits"),
        email=scenario.get("email"),
        phone=scenario.get("phone"),
        push_token=scenario.get("pushToken"),
        preferred_channel=scenario.get("preferredChannel"),
        channels=[_channel(c) for c in scenario["channels"]] if "channels" in scenario else None,
    )


@pytest.mark.parametrize("case", WIRE, ids=[c["name"] for c in WIRE])
async def test_wire(case: dict[str, Any], api: Api, sleeps: Sleeps) -> None:
    """Each wire case serializes exactly as the official SDKs do."""
    scenario = case["scenario"]
    clock = Clock()
    if "clockIso" in scenario:
        clock.now = datetime.fromisoformat(scenario["clockIso"].replace("Z", "+00:00")).timestamp()
    async with whisperr.AsyncClient(
        api_key=API_KEY, transport=api.transport(), clock=clock, sleep=sleeps
    ) as client:
        _run_scenario(client, case["op"], scenario)
        await client.flush()
    [request] = api.requests
    assert request.url.path == case["endpoint"]
    body = api.bodies[0]
    if case["op"] == "identify":
        assert body == case["expectedBody"]
        return
    [event] = body["events"]
    for key in case.get("contextMustContain", []):
        assert event["context"][key]
    if case.get("occurredAtRfc3339Z"):
        assert RFC3339_MS_Z.fullmatch(event["occurred_at"])
    if "expectedOccurredAt" in case:
        assert event["occurred_at"] == case["expectedOccurredAt"]
    volatile = {"occurred_at", "context"}
    assert {k: v for k, v in event.items() if k not in volatile} == case["expectedEvent"]


@pytest.mark.parametrize("case", BEHAVIOR, ids=[c["name"] for c in BEHAVIOR])
async def test_behavior(case: dict[str, Any], api: Api, sleeps: Sleeps, clock: Clock) -> None:
    """Auth and exhausted retries keep the event for a later flush; other 4xx drop it."""
    first, recovery = case["firstResponse"], case["recoveryResponse"]
    assert first["status"] in STATUS_CLASSES.get(first["classification"], range(400, 500))
    api.script = [httpx.Response(first["status"])]
    api.default = recovery["status"]
    reports: list[whisperr.DeliveryReport] = []
    expect = case["expect"]
    async with whisperr.AsyncClient(
        api_key=API_KEY,
        transport=api.transport(),
        clock=clock,
        sleep=sleeps,
        max_retries=case.get("clientOptions", {}).get("maxRetries", 0),
        on_error=reports.append,
    ) as client:
        scenario = case["scenario"]
        message_id = client.track(
            scenario["externalUserId"], scenario["eventType"], scenario.get("properties")
        )
        await client.flush()
        assert [r.type for r in reports] == [expect["errorType"]]
        assert reports[0].message_ids == (message_id,)
        assert (client.stats().queued == 1) is expect["retainedAfterFirstFlush"]
        await client.flush()
        assert (len(api.requests) == 2) is expect["retriesAfterRecovery"]
        assert (client.stats().delivered == 1) is expect["deliveredAfterRecovery"]
        if expect.get("stableMessageIdOnRetry"):
            ids = [body["events"][0]["context"]["$message_id"] for body in api.bodies]
            assert ids == [message_id, message_id]
