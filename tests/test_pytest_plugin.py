"""The pytest plugin, as a user's project meets it: inner pytest runs of README examples.

Each test writes a small project with ``pytester`` and runs pytest on it (in this process, or in
a fresh one) with only the plugins installed in this environment: whisperr's, and anyio's, which
comes with anyio. It checks the outcomes, failures included: the kit must be able to fail a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"

# Verbatim from README.md: the FastAPI service of "Using it", and the blocks of "Testing your
# code" (test_readme_shows_these_examples keeps them in step).
FASTAPI_APP = """\
from contextlib import asynccontextmanager
from fastapi import FastAPI
import whisperr


@asynccontextmanager
async def lifespan(app: FastAPI):
    whisperr.init()  # reads WHISPERR_API_KEY (and any other WHISPERR_* setting)
    yield
    await whisperr.flush(timeout=5)  # deliver what the last requests tracked
    await whisperr.shutdown()  # close the pool, accounting for anything left


app = FastAPI(lifespan=lifespan)


@app.post("/payments/{user_id}/failed")
async def payment_failed(user_id: str) -> dict[str, str]:
    return {"message_id": whisperr.track(user_id, "payment_failed", {"amount_cents": 4900})}


@app.post("/exports/{user_id}")
def export(user_id: str) -> None:  # a sync route runs in a worker thread: track() is thread-safe
    whisperr.track(user_id, "export_requested")
"""

CONFTEST = """\
# conftest.py
import pytest


@pytest.fixture
def anyio_backend() -> str:  # without it, anyio runs each async test on every backend installed
    return "asyncio"
"""

TEST_CHECKOUT = """\
# test_checkout.py
import pytest

import whisperr
from whisperr.testing import Capture


def checkout(user_id: str, card: str) -> None:  # code under test
    if card == "declined":
        whisperr.track(user_id, "payment_failed", {"amount_cents": 4900, "reason": "declined"})


async def renew(user_id: str) -> None:  # async code under test
    whisperr.track(user_id, "renewal_failed", {"attempt": 1})


def test_a_decline_is_tracked(whisperr_capture: Capture) -> None:
    checkout("user_8842", card="declined")  # no flush: reading the capture waits for delivery
    event = whisperr_capture.assert_tracked(
        "payment_failed", user="user_8842", properties={"amount_cents": 4900}
    )
    assert event.properties["reason"] == "declined"


def test_a_payment_tracks_nothing(whisperr_capture: Capture) -> None:
    checkout("user_8842", card="valid")
    whisperr_capture.assert_nothing_tracked()


@pytest.mark.anyio  # anyio's pytest plugin is installed with whisperr
async def test_a_failed_renewal_is_tracked(whisperr_capture: Capture) -> None:
    await renew("user_8842")
    whisperr_capture.assert_tracked("renewal_failed", user="user_8842", count=1)


@pytest.mark.anyio
async def test_with_a_client_of_its_own() -> None:
    capture = Capture()  # an in-memory Whisperr API, and a FixedClock
    async with capture.client() as client:  # leaving the block delivers what is queued
        client.track("user_8842", "seats_added", {"seats": 3})
    capture.assert_tracked("seats_added", properties={"seats": 3})
"""

TEST_APP = """\
# test_app.py
import httpx
import pytest

from whisperr.testing import Capture

from app import app  # the FastAPI service above, as app.py: its lifespan calls whisperr.init()


@pytest.mark.anyio
async def test_a_failed_payment_is_tracked(whisperr_capture: Capture) -> None:
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):  # init() and shutdown() keep the capture
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            response = await http.post("/payments/user_8842/failed")
            await http.post("/exports/user_8842")
    event = whisperr_capture.assert_tracked("payment_failed", user="user_8842")
    assert event.message_id == response.json()["message_id"]
    whisperr_capture.assert_tracked("export_requested", user="user_8842", count=1)
"""

HEAVY = {"httpx", "anyio", "attrs", "orjson"}


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An empty project, with no WHISPERR_* variable and no module named like its own."""
    for name in [n for n in sys.modules if n == "app" or n.startswith("test_")]:
        monkeypatch.delitem(sys.modules, name)
    for variable in [v for v in os.environ if v.startswith("WHISPERR_")]:
        monkeypatch.delenv(variable)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in this process (its warnings filters too: an error), without the cache."""
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def test_the_plugin_imports_nothing_heavy() -> None:
    """pytest imports the plugin at every start: it must not pull in the SDK's dependencies."""
    code = (
        "import sys, whisperr._pytest_plugin; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_readme_examples_in_a_fresh_pytest(project: pytest.Pytester) -> None:
    """The README's tests, plain and async, and its FastAPI service, in a pytest process of
    their own (the plugin found through its entry point), with every warning an error."""
    project.makepyfile(conftest=CONFTEST, test_checkout=TEST_CHECKOUT)
    project.makepyfile(app=FASTAPI_APP, test_app=TEST_APP)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=5)


def test_a_missing_event_fails_the_test(project: pytest.Pytester) -> None:
    """What was not tracked fails the inner test, with what was tracked instead."""
    project.makepyfile(
        conftest=CONFTEST,
        test_checkout=TEST_CHECKOUT.replace('card == "declined"', 'card == "expired"'),
    )
    result = run(project, "-k", "decline")
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(
        ["*AssertionError: expected 'payment_failed' for user 'user_8842'*", "*  nothing*"]
    )


def test_an_unexpected_event_fails_the_test(project: pytest.Pytester) -> None:
    """assert_nothing_tracked() fails for an event tracked in a plain test, not flushed."""
    project.makepyfile(
        conftest=CONFTEST, test_checkout=TEST_CHECKOUT.replace('card == "declined"', "card")
    )
    result = run(project, "-k", "nothing")
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(
        ["*expected no events, received 1:*", "*user_8842 payment_failed {'amount_cents': 4900*"]
    )


def test_a_wrong_count_fails_an_async_test(project: pytest.Pytester) -> None:
    """An async test fails too: the same event tracked twice is not count=1."""
    project.makepyfile(
        conftest=CONFTEST,
        test_checkout=TEST_CHECKOUT.replace(
            'await renew("user_8842")', 'await renew("user_8842")\n    await renew("user_8842")'
        ),
    )
    result = run(project, "-k", "renewal")
    result.assert_outcomes(failed=1, deselected=3)
    result.stdout.fnmatch_lines(["*'renewal_failed' for user 'user_8842'*1 time(s), found 2*"])


def test_a_wrong_fastapi_assertion_fails(project: pytest.Pytester) -> None:
    """The FastAPI test fails when the app tracked something else."""
    project.makepyfile(
        conftest=CONFTEST,
        app=FASTAPI_APP.replace('"export_requested"', '"export_started"'),
        test_app=TEST_APP,
    )
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*user_8842 export_started {}*"])


def test_fastapi_test_client_in_a_plain_test(project: pytest.Pytester) -> None:
    """The same app under Starlette's TestClient (its lifespan in a portal thread's event loop),
    run twice in one plain test: the capture stays through both shutdowns."""
    project.makepyfile(
        app=FASTAPI_APP,
        test_app="""
        import whisperr
        from fastapi.testclient import TestClient

        from app import app


        def test_twice(whisperr_capture):
            for user in ("user_1", "user_2"):
                with TestClient(app) as http:
                    assert http.post(f"/payments/{user}/failed").status_code == 200
                    assert http.post(f"/exports/{user}").status_code == 200
            whisperr.track("user_3", "after_shutdown")  # still installed, still open
            assert [(e.user, e.event_type) for e in whisperr_capture.events] == [
                ("user_1", "payment_failed"),
                ("user_1", "export_requested"),
                ("user_2", "payment_failed"),
                ("user_2", "export_requested"),
                ("user_3", "after_shutdown"),
            ]
        """,
    )
    # Recent Starlette deprecates TestClient over httpx (it wants httpx2): not our concern here.
    ignore = "ignore:Using `httpx` with `starlette.testclient` is deprecated"
    run(project, "-W", ignore).assert_outcomes(passed=1)


def test_the_fixture_on_every_anyio_backend(project: pytest.Pytester) -> None:
    """With no anyio_backend fixture in the project, anyio runs each test on asyncio and trio:
    the capture's client delivers from its own thread, so both pass."""
    pytest.importorskip("trio")
    project.makepyfile(test_checkout=TEST_CHECKOUT)
    result = run(project, "-v", "-k", "renewal")
    result.assert_outcomes(passed=2, deselected=4)
    result.stdout.fnmatch_lines(["*test_a_failed_renewal_is_tracked?trio? PASSED*"])


def test_readme_shows_these_examples() -> None:
    """The examples above are the README's, verbatim."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Testing your code") :]
    section = section[: section.index("\n## ", 1)]
    assert FASTAPI_APP in text
    for block in (CONFTEST, TEST_CHECKOUT, TEST_APP):
        assert f"```python\n{block}```" in section
