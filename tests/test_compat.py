"""The official SDK's public API (whisperr 0.2.1), on this SDK's engine.

The official README's examples run unchanged, as subprocesses, against the bundled server (the
environment points them at it: WHISPERR_BASE_URL); what the server stored is what counts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import whisperr
from whisperr.server import LocalServer, create_app

from .conftest import API_KEY
from .test_core import make_scheduler, put_tracks


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


def run_unchanged(code: str, server: LocalServer) -> subprocess.CompletedProcess[str]:
    """Run official example code as its own program, with the environment pointing at us."""
    env = {"WHISPERR_API_KEY": API_KEY, "WHISPERR_BASE_URL": server.url, "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


QUICK_START = """
    import os
    from whisperr import Whisperr

    whisperr = Whisperr(api_key=os.environ["WHISPERR_API_KEY"])

    # A server-side churn signal:
    whisperr.track("user_8842", "payment_failed", {"amount_cents": 4900, "reason": "card_declined"})

    # Associate traits / contact channels with a user:
    whisperr.identify("user_8842", email="ada@example.com", traits={"plan": "pro"})

    # Deliver everything before the process exits:
    whisperr.shutdown()
"""

BILLING = """
    import os
    from whisperr import BillingEvent, Whisperr

    whisperr = Whisperr(
        api_key=os.environ["WHISPERR_API_KEY"],
        app_version=os.environ.get("RELEASE_VERSION"),  # for example "2026.10.1" or a git SHA
    )
    whisperr.track(
        "user_8842",
        BillingEvent.MEMBERSHIP_STARTED,
        {
            "plan_id": "pro_monthly",
            "price": 9.99,  # major units, not cents
            "currency": "USD",  # ISO 4217, upper case
            "plan_period": "P1M",  # ISO 8601 duration
            "transaction_id": "1000000912345678",
            "store": "app_store",
            "is_first_ever": True,
            "access_source": "self_subscription",
            "current_period_ends_at": "2026-11-12T10:00:00Z",
        },
    )
    user_id = "user_17"
    whisperr.track(user_id, "report_generated")
    whisperr.flush()
"""


def test_the_official_quick_start_runs_unchanged(server: LocalServer) -> None:
    run_unchanged(QUICK_START, server)
    [event] = server.app.events
    assert (event["external_user_id"], event["event_type"]) == ("user_8842", "payment_failed")
    assert event["properties"] == {"amount_cents": 4900, "reason": "card_declined"}
    [identify] = server.app.identifies
    assert identify["traits"] == {"plan": "pro"}
    assert [(c["channel"], c["address"]) for c in identify["channels"]] == [
        ("email", "ada@example.com")
    ]


def test_the_official_billing_and_short_lived_examples_run_unchanged(server: LocalServer) -> None:
    """Including flush() without shutdown(): the exit still delivers nothing twice."""
    run_unchanged(BILLING, server)
    types = [(e["external_user_id"], e["event_type"]) for e in server.app.events]
    assert types == [("user_8842", "membership_started"), ("user_17", "report_generated")]
    assert server.app.events[0]["properties"]["price"] == 9.99


def test_debug_logs_to_stderr(server: LocalServer) -> None:
    code = """
        from whisperr import Whisperr
        w = Whisperr("wrk_not_the_key", debug=True, max_retries=0)
        w.track("user_1", "payment_failed")
        w.shutdown(timeout=5)
    """
    done = run_unchanged(code, server)
    assert "[whisperr] ERROR" in done.stderr  # the refused key, on stderr as the official
    assert "wrk_not_the_key" not in done.stderr


def test_billing_event_names() -> None:
    names = {v for k, v in vars(whisperr.BillingEvent).items() if k.isupper()}
    assert len(names) == 11
    assert whisperr.BillingEvent.TRIAL_STARTED == "trial_started"
    assert whisperr.BillingEvent.REFUND_GRANTED == "refund_granted"
    from whisperr.billing import BillingEvent

    assert BillingEvent is whisperr.BillingEvent


def test_a_positional_key_works_everywhere() -> None:
    for make in (whisperr.AsyncClient, whisperr.Client, whisperr.Whisperr):
        client: Any = make(API_KEY, disabled=True)
        inner = getattr(client, "client", client)
        assert inner.settings.api_key == API_KEY


def test_whisperr_keeps_the_official_surface(server: LocalServer) -> None:
    reports: list[Any] = []
    client = whisperr.Whisperr(
        "wrk_wrong", base_url=server.url, on_error=reports.append, max_retries=0, flush_at=20
    )
    assert client.ready
    assert whisperr.Whisperr(disabled=True).ready is False
    client.track("user_1", "payment_failed")
    client.flush()
    client.shutdown(timeout=2)
    client.shutdown()  # idempotent
    # The official report's attributes, on our DeliveryReport.
    assert [(r.type, r.status) for r in reports][:1] == [("auth", 401)]
    assert "rejected" in reports[0].message


def test_an_official_transport_object_is_refused_clearly() -> None:
    with pytest.raises(whisperr.ConfigError, match="Transport has no counterpart"):
        whisperr.Whisperr(API_KEY, transport=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="api_key is required"):
        whisperr.Whisperr("")
    mock = httpx.MockTransport(lambda r: httpx.Response(202, json={"accepted": 1}))
    assert whisperr.Whisperr(API_KEY, transport=mock).ready


def test_flush_at_sends_a_batch_once_that_many_are_queued() -> None:
    scheduler, intake, _ = make_scheduler(flush_at=20)  # flush_interval 1 s: not yet due
    put_tracks(intake, 19)
    assert scheduler.ready_batch(0.0) is None
    put_tracks(intake, 11)
    batch = scheduler.ready_batch(0.0)
    assert batch is not None
    assert len(batch.items) == 30  # due at 20; it takes all that is queued
    with pytest.raises(whisperr.ConfigError, match="flush_at must be between 1 and"):
        whisperr.Settings(api_key=API_KEY, flush_at=501)


def test_the_current_user_is_bound_per_context(server: LocalServer) -> None:
    with whisperr.Client(api_key=API_KEY, base_url=server.url) as client:
        tracker = whisperr.UserTracker(client, None)
        assert tracker.track("page_viewed") is None  # nobody signed in
        with whisperr.bind("user_7", request_id="req-1") as scope:
            tracker = whisperr.UserTracker(client, whisperr.bind_user("user_8"))
            assert scope.user_id == "user_8"
            tracker.track("page_viewed", {"n": 1}, {"request_id": "mine"})
            tracker.track("page_viewed", {"n": 2})
            tracker.identify({"plan": "pro"})
    stats = client.stats()
    assert stats.dropped_by_reason == {"anonymous": 1}
    assert (stats.tracked, stats.identified) == (3, 1)
    assert stats.tracked + stats.identified == stats.delivered + stats.dropped == 4
    contexts = [(e["external_user_id"], e["context"]["request_id"]) for e in server.app.events]
    assert contexts == [("user_8", "mine"), ("user_8", "req-1")]
    assert server.app.identifies[0]["external_user_id"] == "user_8"
