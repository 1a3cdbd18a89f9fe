"""whisperr.django on the real framework: Django's test clients, gunicorn, the system check.

Each case runs Django in a subprocess (Django's settings are process-wide), against the bundled
local server on 127.0.0.1 in this process; what the server stored is what counts. The
in-process cases configure a minimal project with ``settings.configure()`` and an in-memory
SQLite database shared by the process's threads; the gunicorn and check cases serve and check
the example project, examples/django_app/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from whisperr.server import LocalServer, create_app

from .conftest import API_KEY

pytest.importorskip("django", reason="Django is not installed")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_app"
RUN_TIMEOUT = 60.0
START_TIMEOUT = 15.0


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any WHISPERR_* or DJANGO_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHISPERR_", "DJANGO_"))}
    return {**env, **extra}


def stored_once(server: LocalServer) -> dict[str, dict[str, Any]]:
    """The stored events by $message_id, after checking that none was sent twice or refused."""
    batches = [r for r in server.app.requests if r.path == "/v1/events/batch"]
    assert {r.status for r in batches} <= {202}
    stored = server.app.events
    assert sum(r.events for r in batches) == len(stored)
    return {e["context"]["$message_id"]: e for e in stored}


# -- a minimal project, driven by Django's test clients -------------------------------------

# Configures Django from the SETTINGS variable (JSON, added to the defaults), migrates the
# in-memory database and signs up ada and bob; the script after it defines `urlpatterns`
# (ROOT_URLCONF is the script itself) and prints one RESULT line.
PRELUDE = """
import asyncio, json, os

import django
from django.conf import settings

settings.configure(
    SECRET_KEY="test-only",
    ALLOWED_HOSTS=["testserver"],
    ROOT_URLCONF="__main__",
    INSTALLED_APPS=[
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "whisperr.django.WhisperrConfig",
    ],
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "whisperr.django.WhisperrMiddleware",
    ],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "file:whisperr_test?mode=memory&cache=shared",
        }
    },
    USE_TZ=True,
    **json.loads(os.environ.get("SETTINGS", "{}")),
)
django.setup()

from django.contrib.auth.models import User
from django.core.management import call_command
from django.http import JsonResponse
from django.test import AsyncClient, Client
from django.urls import path

import whisperr
from whisperr.django import get_client

call_command("migrate", verbosity=0)
ada = User.objects.create_user("ada")
bob = User.objects.create_user("bob")


def signed_in(user, client_class=Client):
    client = client_class()
    client.force_login(user)
    return client


def finish(**result):
    get_client().shutdown(timeout=10)
    stats = get_client().stats()
    result["stats"] = {
        "tracked": stats.tracked,
        "delivered": stats.delivered,
        "dropped_by_reason": dict(stats.dropped_by_reason),
    }
    print("RESULT " + json.dumps(result))
"""


def run_django(script: str, server: LocalServer, **settings: Any) -> dict[str, Any]:
    """Run PRELUDE + `script` with `settings` added; its RESULT, once it exits 0."""
    env = clean_env(
        SETTINGS=json.dumps(settings),
        WHISPERR_API_KEY=API_KEY,
        WHISPERR_BASE_URL=server.url,
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", PRELUDE + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def test_sync_view_signed_in_and_anonymous(server: LocalServer) -> None:
    """request.whisperr tracks for request.user.pk; with nobody signed in nothing is sent."""
    result = run_django(
        """
        def report(request):
            message_id = request.whisperr.track("report_viewed", {"n": int(request.GET["n"])})
            request.whisperr.identify({"plan": "pro"}, email="ada@example.com")
            return JsonResponse({
                "message_id": message_id,
                "user": request.whisperr.user_id,
                "client_current": get_client().current().user_id,
                "module_current": whisperr.current().user_id,
            })

        urlpatterns = [path("report", report)]
        whisperr.init(disabled=True)  # whisperr.current() reads the same scope
        ada_client = signed_in(ada)
        answers = [ada_client.get("/report", {"n": 0}).json()]
        answers.append(ada_client.get("/report", {"n": 1}, headers={"X-Request-ID": "r-1"}).json())
        answers += [Client().get("/report", {"n": n}).json() for n in (2, 3)]
        finish(answers=answers, ada=str(ada.pk))
        """,
        server,
        WHISPERR_APP_VERSION="2.0.1",
    )
    ada = result["ada"]
    answers = result["answers"]
    assert [(a["user"], a["client_current"], a["module_current"]) for a in answers] == [
        (ada, ada, ada),
        (ada, ada, ada),
        (None, None, None),
        (None, None, None),
    ]
    assert [a["message_id"] is None for a in answers] == [False, False, True, True]
    stored = stored_once(server)
    assert set(stored) == {answers[0]["message_id"], answers[1]["message_id"]}
    first, second = (stored[a["message_id"]] for a in answers[:2])
    assert (first["external_user_id"], first["event_type"], first["properties"]) == (
        ada,
        "report_viewed",
        {"n": 0},
    )
    assert second["properties"] == {"n": 1}
    assert "request_id" not in first["context"]
    assert second["context"]["request_id"] == "r-1"
    assert first["context"]["app_version"] == "2.0.1"  # WHISPERR_APP_VERSION, from settings
    assert [(i["external_user_id"], i["traits"]) for i in server.app.identifies] == [
        (ada, {"plan": "pro"}),
        (ada, {"plan": "pro"}),
    ]
    # The anonymous events (and identifies) were counted, not sent.
    assert result["stats"]["dropped_by_reason"] == {"anonymous": 2}
    assert result["stats"]["delivered"] == 4  # two events, two identifies


def test_settings_win_over_the_environment(server: LocalServer) -> None:
    """WHISPERR_API_KEY and WHISPERR_BASE_URL in settings.py are used before the environment."""
    result = run_django(
        """
        def view(request):
            return JsonResponse({"message_id": request.whisperr.track("report_viewed")})

        urlpatterns = [path("", view)]
        os.environ["WHISPERR_API_KEY"] = "wrk_wrong_key"  # refused by the server if used
        os.environ["WHISPERR_BASE_URL"] = "http://127.0.0.1:9"  # refuses connections
        finish(message_id=signed_in(ada).get("/").json()["message_id"])
        """,
        server,
        WHISPERR_API_KEY=API_KEY,
        WHISPERR_BASE_URL=server.url,
    )
    assert set(stored_once(server)) == {result["message_id"]}


def test_resolve_user_setting(server: LocalServer) -> None:
    """WHISPERR_RESOLVE_USER names the function that says who the request is for; a user bound
    later in the request (whisperr.bind_user) is seen by request.whisperr, for that request."""
    result = run_django(
        """
        def resolve(request):
            account = request.headers.get("X-Account")
            return f"acct_{account}" if account else None

        def view(request):
            message_id = request.whisperr.track("report_viewed")
            return JsonResponse({"message_id": message_id, "user": request.whisperr.user_id})

        def late(request):  # an authentication step in the view: request.whisperr follows it
            whisperr.bind_user("acct_7")
            return view(request)

        urlpatterns = [path("", view), path("late", late)]
        client = signed_in(ada)  # the resolver decides, not request.user
        answers = [client.get("/", headers={"X-Account": "42"}).json(), client.get("/").json()]
        answers.append(client.get("/late").json())
        finish(answers=answers, after=get_client().current().user_id)
        """,
        server,
        WHISPERR_RESOLVE_USER="__main__.resolve",
    )
    with_header, without, late = result["answers"]
    assert (with_header["user"], without["user"], without["message_id"]) == ("acct_42", None, None)
    assert (late["user"], result["after"]) == ("acct_7", None)
    stored = stored_once(server)
    assert {k: e["external_user_id"] for k, e in stored.items()} == {
        with_header["message_id"]: "acct_42",
        late["message_id"]: "acct_7",
    }
    assert result["stats"]["dropped_by_reason"] == {"anonymous": 1}


def test_scope_does_not_leak_between_requests(server: LocalServer) -> None:
    """After each response the thread has no user bound, also after a view that raised."""
    result = run_django(
        """
        def view(request):
            return JsonResponse({"user": get_client().current().user_id})

        def boom(request):
            request.whisperr.track("report_viewed")
            raise RuntimeError("the view failed")

        urlpatterns = [path("", view), path("boom", boom)]
        ada_client, bob_client = signed_in(ada), signed_in(bob)
        ada_client.raise_request_exception = False
        seen, between = [], []
        for client, url in [
            (ada_client, "/"), (Client(), "/"), (bob_client, "/"), (ada_client, "/boom"),
            (Client(), "/"),
        ]:
            response = client.get(url)
            seen.append(response.json()["user"] if response.status_code == 200 else 500)
            between.append(get_client().current().user_id)
        finish(seen=seen, between=between, ada=str(ada.pk), bob=str(bob.pk))
        """,
        server,
    )
    ada, bob = result["ada"], result["bob"]
    assert result["seen"] == [ada, None, bob, 500, None]
    assert result["between"] == [None] * 5
    [event] = stored_once(server).values()  # the failed view's event still counts
    assert event["external_user_id"] == ada


def test_async_view_and_middleware(server: LocalServer) -> None:
    """Under Django's AsyncClient the middleware runs async: the async view sees its user,
    concurrent requests keep theirs, a sync view under ASGI too; nothing leaks."""
    result = run_django(
        """
        async def aview(request):
            await asyncio.sleep(0)
            message_id = request.whisperr.track("export_requested", {"n": int(request.GET["n"])})
            return JsonResponse({
                "message_id": message_id,
                "user": request.whisperr.user_id,
                "current": get_client().current().user_id,
            })

        def view(request):  # a sync view under ASGI: run in a thread, the scope goes with it
            return JsonResponse({"user": get_client().current().user_id})

        urlpatterns = [path("a", aview), path("s", view)]
        clients = {"ada": signed_in(ada, AsyncClient), "bob": signed_in(bob, AsyncClient)}
        clients["anon"] = AsyncClient()

        async def main():
            answers, between = [], []
            for n, who in enumerate(["ada", "anon", "bob", "anon"]):
                answers.append((await clients[who].get("/a", {"n": n})).json())
                between.append(get_client().current().user_id)
            sync_users = [(await clients[w].get("/s")).json()["user"] for w in ("ada", "anon")]
            concurrent = await asyncio.gather(
                *(clients[w].get("/a", {"n": 10 + i}) for i, w in enumerate(["ada", "bob"] * 5))
            )
            return answers, between, sync_users, [r.json() for r in concurrent]

        answers, between, sync_users, concurrent = asyncio.run(main())
        # What Django relies on to keep the chain async: the instance is a coroutine function
        # when what it wraps is one (else Django would run it in a thread).
        from asgiref.sync import iscoroutinefunction
        from whisperr.django import WhisperrMiddleware

        async def async_handler(request): ...

        modes = [
            iscoroutinefunction(WhisperrMiddleware(handler))
            for handler in (async_handler, lambda request: None)
        ]
        finish(
            answers=answers, between=between, sync_users=sync_users, concurrent=concurrent,
            modes=modes, ada=str(ada.pk), bob=str(bob.pk),
        )
        """,
        server,
    )
    ada, bob = result["ada"], result["bob"]
    answers = result["answers"]
    assert [(a["user"], a["current"]) for a in answers] == [
        (ada, ada),
        (None, None),
        (bob, bob),
        (None, None),
    ]
    assert result["modes"] == [True, False]
    assert result["between"] == [None] * 4
    assert result["sync_users"] == [ada, None]
    assert [(a["user"], a["current"]) for a in result["concurrent"]] == [(ada, ada), (bob, bob)] * 5
    tracked = [(0, answers[0]), (2, answers[2]), *enumerate(result["concurrent"], 10)]
    expected = {a["message_id"]: (a["user"], n) for n, a in tracked}
    stored = stored_once(server)
    assert {k: (e["external_user_id"], e["properties"]["n"]) for k, e in stored.items()} == expected
    assert result["stats"]["dropped_by_reason"] == {"anonymous": 2}


# -- the example project under gunicorn ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_env(server: LocalServer, database: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        WHISPERR_API_KEY=API_KEY,
        WHISPERR_BASE_URL=server.url,
        DJANGO_DB=str(database),
        DJANGO_SETTINGS_MODULE="settings",
        **extra,
    )


SIGN_IN = """
import json
import django

django.setup()
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

call_command("migrate", verbosity=0)
users = {}
for name in ("ada", "bob"):
    user = User.objects.create_user(name)
    client = Client()
    client.force_login(user)  # a real session, stored in the database gunicorn reads
    users[name] = [str(user.pk), client.cookies["sessionid"].value]
print(json.dumps(users))
"""

REQUESTS = 24


@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn does not run on Windows")
@pytest.mark.parametrize("when", ["at_exit", "while_running"])
def test_example_under_gunicorn(server: LocalServer, tmp_path: Path, when: str) -> None:
    """The example, on 2 sync gunicorn workers: each signed-in request's event is stored once
    for its user, delivered from the client's own thread while the workers run (a short flush
    interval) or, when nothing was due yet, as each worker exits on SIGTERM."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    interval = "60" if when == "at_exit" else "0.05"
    env = example_env(server, tmp_path / "db.sqlite3", WHISPERR_FLUSH_INTERVAL=interval)
    signed = subprocess.run(
        [sys.executable, "-W", "error", "-c", SIGN_IN],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert signed.returncode == 0, signed.stdout + signed.stderr
    users: dict[str, list[str]] = json.loads(signed.stdout)

    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn", "wsgi:application", "--chdir", str(EXAMPLE),
        "--bind", f"127.0.0.1:{port}", "--workers", "2", "--worker-class", "sync",
        "--graceful-timeout", "10", "--log-level", "warning",
    ]  # fmt: skip
    log = tmp_path / "gunicorn.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    expected: dict[str, tuple[str, str, dict[str, Any]]] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
            deadline = time.monotonic() + START_TIMEOUT
            while True:  # a bounded poll until gunicorn serves (the root path is a 404)
                assert process.poll() is None, f"gunicorn exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"gunicorn did not serve:\n{log.read_text()}"
                try:
                    if http.get("/").status_code == 404:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        for n in range(REQUESTS):
            who = ["ada", "bob", "anon"][n % 3]
            cookies = {"sessionid": users[who][1]} if who != "anon" else {}
            with httpx.Client(base_url=url, trust_env=False, timeout=10, cookies=cookies) as http:
                if n % 2:
                    response = http.get(f"/reports/r{n}")
                    sent_as = ("report_viewed", {"report": f"r{n}"})
                else:
                    response = http.get("/export", params={"format": f"f{n}"})
                    sent_as = ("export_requested", {"format": f"f{n}"})
            assert response.status_code == 200, f"{response.text}\n{log.read_text()}"
            answer = response.json()
            if who == "anon":
                assert answer == {"user": None, "message_id": None}
            else:
                assert answer["user"] == users[who][0]
                expected[answer["message_id"]] = (users[who][0], *sent_as)
        if when == "at_exit":
            assert server.app.events == []  # nothing due yet: still in the workers' memory
        else:
            deadline = time.monotonic() + 10
            while len(server.app.events) < len(expected):  # a bounded poll, gunicorn running
                assert time.monotonic() < deadline, "the events were not delivered while running"
                time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind by a master that died
    output = log.read_text()
    assert returncode == 0, output
    assert len(expected) == REQUESTS * 2 // 3
    # The workers logged nothing at WARNING: the anonymous events' drops are INFO (counted in
    # stats(), see the test-client cases), not a warning per public page.
    assert output.strip() == "", output
    stored = stored_once(server)
    assert {
        k: (e["external_user_id"], e["event_type"], e["properties"]) for k, e in stored.items()
    } == expected, output
    assert {e["context"]["app_version"] for e in stored.values()} == {"1.4.0"}


# -- the system check ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, "api_key is required"),
        ({"WHISPERR_API_KEY": API_KEY, "WHISPERR_BASE_URL": "ftp://x"}, "base_url must be an"),
        ({"WHISPERR_DISABLED": "1"}, None),
        ({"WHISPERR_API_KEY": API_KEY}, None),
    ],
)
def test_system_check(tmp_path: Path, env: dict[str, str], problem: str | None) -> None:
    """`manage.py check` on the example reports whisperr.E001 unless the client can be built."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "manage.py", "check"],
        cwd=EXAMPLE,
        env=clean_env(DJANGO_DB=str(tmp_path / "db.sqlite3"), **env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    if problem is None:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "whisperr" not in done.stdout + done.stderr
    else:
        assert done.returncode == 1, done.stdout + done.stderr
        assert "(whisperr.E001) Whisperr: " + problem in done.stderr


# -- the module's edges ----------------------------------------------------------------------


def test_import_whisperr_does_not_import_django() -> None:
    code = "import sys, whisperr; assert 'django' not in sys.modules, 'django was imported'"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr


UWSGI = """
import sys, types

uwsgi = sys.modules["uwsgi"] = types.ModuleType("uwsgi")  # what a uWSGI worker provides
calls = []
uwsgi.atexit = lambda: calls.append("previous hook")

import django
from django.conf import settings

settings.configure()
django.setup()
from whisperr.django import get_client

get_client().track("user_1", "job_completed", message_id="uwsgi-exit")
uwsgi.atexit()  # as uWSGI calls it when the worker stops
stats = get_client().stats()
print(calls, stats.delivered, stats.queued)
"""


def test_uwsgi_atexit_hook(server: LocalServer) -> None:
    """Under uWSGI (a stand-in module here), its atexit hook delivers, then calls the previous
    hook. uWSGI itself is not installed: this checks what the module does with the hook."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", UWSGI],
        env=clean_env(WHISPERR_API_KEY=API_KEY, WHISPERR_BASE_URL=server.url),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["['previous", "hook']", "1", "0"]
    assert set(stored_once(server)) == {"uwsgi-exit"}
