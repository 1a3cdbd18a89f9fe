"""Every fenced code block of README.md, run (or, for a command that cannot run here, checked)
by a driver of its own.

The blocks: a line opening with ``` (its language after it: python, console, text...) up to the
next line that is ``` alone. Each block is kept with its language, its line number and the
innermost heading above it.

**Keys.** A driver is registered with `@drives(key)`, the key being that heading and the block's
ordinal under it: "In a FastAPI service #1", "Delivering now: `send()` #2". So editing a
block's text keeps its driver, and so does adding, moving or renaming another section.
Inserting a block before another under the same heading shifts the ordinals: the drivers, which
assert what their own block does, then fail, and `test_every_block_has_a_driver` names the
block left without one. The key "<heading> #*" takes every block under that heading (for
"Testing your code", whose blocks tests/test_pytest_plugin.py runs verbatim). A block no
driver takes fails `test_every_block_has_a_driver`, and so does a driver whose block is gone.

**Python blocks run as written**, each saved to a file and run in a fresh interpreter
(`sys.executable -W error`), against the bundled local server of this module (a `LocalServer`
in a thread, reset before each test) through WHISPERR_API_KEY and WHISPERR_BASE_URL. What
counts is what the server stored (`GET /_local/events`), and that its request records show
nothing stored twice. Web apps are served by their real servers in a subprocess (uvicorn's CLI,
aiohttp's `web.run_app`) on a 127.0.0.1 socket bound here and passed down, called over HTTP,
then stopped with SIGTERM, which runs their shutdown. The Django blocks run inside a minimal
project (tests/readme/django_project.py) called through Django's test clients; the Celery
block is a real prefork worker against a redis-server started here. A driver may append a few
lines of checks after a block, in the same interpreter (they follow a marker comment in the
saved file); the block's own lines are never changed.

**Console blocks.** Commands that would download (pip, nox) or run for minutes (the suite, the
benchmarks) cannot run in a test; for those the driver checks that every part is real: the
project that `pip install .` installs, pip's options, the nox sessions and defaults of
noxfile.py, the tests a `-k` selects, the flags a script's `--help` lists. The others run:
the virtual environment commands (in a temporary directory), and the bundled server's commands
(on a free port instead of the one shown, with `python` being this interpreter).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from whisperr.server import Fault, LocalServer, create_app

from .test_lifecycle import Lines, end_session, redis_server, stop

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SUPPORT = Path(__file__).resolve().parent / "readme"
API_KEY = "wrk_readme_local"
RUN_TIMEOUT = 60.0  # for one block's script (most take about a second)
START_TIMEOUT = 20.0  # for a server, app or worker to be ready
STOP_TIMEOUT = 20.0  # for one to exit after SIGTERM
ARRIVE_TIMEOUT = 15.0  # for an event to reach the local server once its cause has happened
CHECKS = "\n\n# -- checks appended by tests/test_readme.py (not in README.md) --\n"
# For the web apps: no batch leaves on its timer during a test, so what is stored after the
# server stopped was delivered by the app's shutdown.
LONG_INTERVAL = {"WHISPERR_FLUSH_INTERVAL": "60"}

F = TypeVar("F", bound=Callable[..., Any])
Signal = tuple[str, str, dict[str, Any]]  # (external_user_id, event_type, properties)


# -- the blocks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    heading: str  # the innermost heading above the block
    ordinal: int  # 1 for the first block under that heading
    lang: str  # after the opening ```: python, console, text...
    line: int  # of the opening ```, 1-based
    code: str  # between the fences, ending with a newline

    @property
    def key(self) -> str:
        return f"{self.heading} #{self.ordinal}"

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.key}, {self.lang or 'no language'})"


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with its heading and ordinal under it.

    A fence may be indented (in a list item): the block's lines lose that indentation. A heading
    that appears twice continues its ordinals, so that keys stay unique.
    """
    blocks: list[Block] = []
    heading, counts = "", {"": 0}
    opened: tuple[int, str, str] | None = None  # line, language, indentation
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if opened is None:
            if match := re.match(r"#{1,6} (.+)", line):
                heading = match[1].strip()
                counts.setdefault(heading, 0)
            elif match := re.match(r"(\s*)```\s*([\w+-]*)\s*$", line):
                opened, body = (number, match[2], match[1]), []
            continue
        if line.strip() == "```":
            counts[heading] += 1
            code = "\n".join(b.removeprefix(opened[2]) for b in body) + "\n"
            blocks.append(Block(heading, counts[heading], opened[1], opened[0], code))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"README.md:{opened[0]}: a fence is never closed"
    return blocks


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))
BY_KEY = {block.key: block for block in BLOCKS}
DRIVERS: dict[str, str] = {}  # key -> the test that drives it


def drives(key: str) -> Callable[[F], F]:
    """Register the decorated test as the driver of the block `key` ("<heading> #*": all)."""

    def register(test: F) -> F:
        assert key not in DRIVERS, f"two drivers for {key!r}"
        DRIVERS[key] = test.__name__
        return test

    return register


def readme_block(key: str) -> Block:
    if key not in BY_KEY:
        pytest.fail(f"README.md has no block {key!r} any more; its blocks: {sorted(BY_KEY)}")
    return BY_KEY[key]


def blocks_under(heading: str) -> list[Block]:
    return [block for block in BLOCKS if block.heading == heading]


# -- the local server, and running blocks -----------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    """This environment without WHISPERR_*, DJANGO_*, CELERY_* or proxy variables, plus extra."""
    prefixes = ("WHISPERR_", "DJANGO_", "CELERY_")
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(prefixes) and k.lower() not in proxies
    }
    return env | {"PYTHONUNBUFFERED": "1"} | extra


@dataclass
class Api:
    """The module's local server, as a block sees it, and what it stored."""

    server: LocalServer
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a block: its WHISPERR_* settings point here."""
        return base_env(WHISPERR_API_KEY=API_KEY, WHISPERR_BASE_URL=self.url, **extra)

    def stored(self) -> dict[str, Any]:
        """`GET /_local/events`: the stored events (one per $message_id) and identifies."""
        response = self.http.get("/_local/events")
        assert response.status_code == 200, response
        stored: dict[str, Any] = orjson.loads(response.content)
        return stored

    def events(self) -> dict[str, Signal]:
        """The stored events by $message_id, after checking that none arrived twice.

        The server keeps one copy per $message_id, so a duplicate does not show in its store;
        it shows as more events in the requests it accepted than it stored.
        """
        stored = self.stored()["events"]
        accepted = sum(
            r.events
            for r in self.server.app.requests
            if r.path in ("/v1/events/batch", "/v1/events/track") and r.status in (200, 202)
        )
        assert accepted == len(stored), f"{accepted} events accepted, {len(stored)} stored"
        return {
            e["context"]["$message_id"]: (e["external_user_id"], e["event_type"], e["properties"])
            for e in stored
        }

    def signals(self) -> list[Signal]:
        """The stored events, without their ids, sorted."""
        return sorted(self.events().values(), key=repr)

    def wait_for_events(self, count: int, timeout: float = ARRIVE_TIMEOUT) -> bool:
        """Poll the store until it holds `count` events; False if it does not in `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.stored()["events"]) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture(scope="module")
def local_server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


@pytest.fixture
def api(local_server: LocalServer) -> Iterator[Api]:
    """The module's local server, emptied (POST /_local/reset) and without faults."""
    with httpx.Client(base_url=local_server.url, trust_env=False, timeout=10) as http:
        assert http.post("/_local/reset").status_code == 200
        local_server.app.faults.clear()
        yield Api(local_server, http)
        local_server.app.faults.clear()


def save(block: Block, path: Path, checks: str = "") -> Path:
    """Write the block as written (and the driver's checks after it, if any) to `path`."""
    path.write_text(block.code + (CHECKS + checks.strip() + "\n" if checks else ""))
    return path


def run_block(
    block: Block, tmp_path: Path, env: dict[str, str], *, checks: str = "", name: str = "block"
) -> str:
    """Run the block as a script in a fresh interpreter; its stdout, once it exits 0 quietly."""
    script = save(block, tmp_path / f"{name}.py", checks)
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    assert done.returncode == 0, f"{block} exited with {done.returncode}\n{output}"
    assert done.stderr == "", f"{block}: no warning or log line expected\n{output}"
    return done.stdout


@dataclass
class Served:
    """A web app served by its real server in a subprocess."""

    url: str
    process: subprocess.Popen[str]
    lines: Lines

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=10)

    def stop(self) -> str:
        """SIGTERM, then wait for the exit (its shutdown runs); the whole log."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the app did not stop within {STOP_TIMEOUT} s:\n{self.lines.text()}")
        self.lines.wait_for(lambda line: False, STOP_TIMEOUT)  # read the log to its end
        log = "\n".join(self.lines.lines)
        # uvicorn ends by re-raising SIGTERM once its shutdown is complete; aiohttp returns.
        assert self.process.returncode in (0, -signal.SIGTERM), log
        assert "Traceback" not in log, log
        return log


@contextlib.contextmanager
def serving(
    command: Callable[[int], list[str]], *, cwd: Path, env: dict[str, str], ready: str
) -> Iterator[Served]:
    """Run `command(fd)`, which serves on the listening socket `fd`, until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        process = subprocess.Popen(
            command(sock.fileno()),
            cwd=cwd,
            env=env,
            pass_fds=(sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    finally:
        sock.close()  # the app's process has its own copy
    assert process.stdout is not None
    lines = Lines(process.stdout)
    try:
        started = lines.wait_for(lambda line: ready in line, START_TIMEOUT)
        assert started is not None, f"the app did not start:\n{lines.text()}"
        yield Served(url, process, lines)
    finally:
        stop(process)
        end_session(process)
        lines.close()


def uvicorn_serving(
    block: Block, tmp_path: Path, env: dict[str, str]
) -> contextlib.AbstractContextManager[Served]:
    """uvicorn's own CLI serving the block's `app` (the block saved as readme_app.py)."""
    save(block, tmp_path / "readme_app.py")

    def command(fd: int) -> list[str]:
        uvicorn = [sys.executable, "-W", "error", "-m", "uvicorn", "readme_app:app"]
        return [*uvicorn, "--fd", str(fd), "--app-dir", str(tmp_path), "--no-access-log"]

    return serving(command, cwd=tmp_path, env=env, ready="Application startup complete.")


AIOHTTP_RUNNER = """\
import socket, sys
from aiohttp import web
from readme_app import app

sock = socket.socket(fileno=int(sys.argv[1]))
web.run_app(app, sock=sock, print=lambda line: print("READY", line, flush=True))
"""


def aiohttp_serving(
    block: Block, tmp_path: Path, env: dict[str, str]
) -> contextlib.AbstractContextManager[Served]:
    """`web.run_app()` serving the block's `app` (the block saved as readme_app.py)."""
    save(block, tmp_path / "readme_app.py")

    def command(fd: int) -> list[str]:
        return [sys.executable, "-W", "error", "-c", AIOHTTP_RUNNER, str(fd)]

    return serving(command, cwd=tmp_path, env=env, ready="READY")


def assert_uvicorn_shut_down(log: str) -> None:
    assert "Application shutdown complete." in log, log  # the lifespan's shutdown ran


# -- the coverage test ------------------------------------------------------------------------


def coverage_problems(blocks: list[Block], drivers: dict[str, str]) -> list[str]:
    """Blocks no driver takes, and drivers whose block (or section, for "#*") is gone."""
    headings = {b.heading for b in blocks}
    keys = {b.key for b in blocks}
    whole = {key.removesuffix(" #*") for key in drivers if key.endswith(" #*")}
    problems = [
        f"{b}: no driver" for b in blocks if b.key not in drivers and b.heading not in whole
    ]
    problems += [
        f"{key}: {test} drives a block that is gone"
        for key, test in drivers.items()
        if key not in keys and key.removesuffix(" #*") not in (headings & whole)
    ]
    return sorted(set(problems))


def test_every_block_has_a_driver() -> None:
    """Each block of README.md is taken by a driver, and each driver's block exists."""
    assert len(BLOCKS) >= 20, f"only {len(BLOCKS)} blocks found: is the parser broken?"
    problems = coverage_problems(BLOCKS, DRIVERS)
    assert not problems, "README.md against tests/test_readme.py:\n" + "\n".join(problems)


def test_coverage_problems() -> None:
    """The coverage check finds a block without a driver and a driver without a block."""
    blocks = [
        Block("A", 1, "python", 3, ""),
        Block("A", 2, "text", 9, ""),
        Block("B", 1, "", 20, ""),
    ]
    assert coverage_problems(blocks, {"A #1": "t1", "A #2": "t2", "B #*": "t3"}) == []
    assert coverage_problems(blocks, {"A #1": "t1", "B #*": "t3", "C #1": "t4", "D #*": "t5"}) == [
        "C #1: t4 drives a block that is gone",
        "D #*: t5 drives a block that is gone",
        "README.md:9 (A #2, text): no driver",
    ]


def test_block_parser() -> None:
    """The parser: headings, ordinals, languages, line numbers, fences inside text."""
    text = "# A\n\n```python\nx = 1\n```\n## B\n```\n$ y\n```\n```text\n# not a heading\n```\n"
    assert read_blocks(text) == [
        Block("A", 1, "python", 3, "x = 1\n"),
        Block("B", 1, "", 7, "$ y\n"),
        Block("B", 2, "text", 10, "# not a heading\n"),
    ]
    listed = "## C\n- a step:\n\n  ```console\n  $ z\n    --flag\n  ```\n"
    assert read_blocks(listed) == [Block("C", 1, "console", 4, "$ z\n  --flag\n")]
    again = "## D\n```\n1\n```\n## D\n```\n2\n```\n"
    assert [b.key for b in read_blocks(again)] == ["D #1", "D #2"]
    with pytest.raises(AssertionError, match="never closed"):
        read_blocks("# A\n```python\nx = 1\n")


# -- the top of the README --------------------------------------------------------------------


@drives("whisperr #1")
def test_install(tmp_path: Path) -> None:
    """`pip install .` from the repository's root: the project there imports as whisperr."""
    check_console(readme_block("whisperr #1"), tmp_path)


@drives("whisperr #2")
def test_quickstart(tmp_path: Path) -> None:
    """The first snippet delivers its event and identify; the api_key it passes wins over
    WHISPERR_API_KEY (a server that takes only its key, and an environment holding another)."""
    block = readme_block("whisperr #2")
    [key] = re.findall(r'api_key="([^"]+)"', block.code)
    with (
        LocalServer(create_app(api_key=key)) as server,
        httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http,
    ):
        api = Api(server, http)
        run_block(block, tmp_path, base_env(WHISPERR_API_KEY=API_KEY, WHISPERR_BASE_URL=api.url))
        signals, identifies = api.signals(), api.stored()["identifies"]
    assert signals == [("user_8842", "payment_failed", {"amount_cents": 4900})]
    assert identifies == [
        {
            "external_user_id": "user_8842",
            "traits": {"plan": "pro"},
            "channels": [{"channel": "email", "address": "ada@example.com", "opted_in": True}],
        }
    ]


@drives("Try it in two commands #1")
def test_try_it_virtual_environment(tmp_path: Path) -> None:
    """Run literally in an empty directory (a POSIX shell, `python3` from PATH): afterwards
    `python` is the new environment's, and its pip runs."""
    block = readme_block("Try it in two commands #1")
    [command] = console_commands(block)
    assert shutil.which("python3") is not None, "no python3 on PATH: the command cannot run"
    probe = 'command -v python && python -c "import sys; print(sys.prefix)" && python -m pip -V'
    done = subprocess.run(
        ["sh", "-c", f"{command} && {probe}"],
        cwd=tmp_path,
        env={k: v for k, v in base_env().items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    python, prefix, pip = done.stdout.splitlines()[-3:]
    venv = tmp_path / ".venv"
    assert Path(python) == venv / "bin" / "python"
    assert Path(prefix).resolve() == venv.resolve()
    assert pip.startswith("pip "), pip
    assert str(venv) in pip, pip


@drives("Try it in two commands #2")
def test_try_it_commands(tmp_path: Path) -> None:
    """`nox -s demo` and the default sessions exist (they download, so they are not run)."""
    check_console(readme_block("Try it in two commands #2"), tmp_path)


# -- Using it ---------------------------------------------------------------------------------


@drives("In a FastAPI service #1")
def test_fastapi_service(api: Api, tmp_path: Path) -> None:
    """Under uvicorn: both routes track; the lifespan's shutdown delivers them, each once."""
    block = readme_block("In a FastAPI service #1")
    with uvicorn_serving(block, tmp_path, api.env(**LONG_INTERVAL)) as app, app.http() as http:
        paid = http.post("/payments/user_8842/failed")
        exported = http.post("/exports/user_1203")
        assert (paid.status_code, exported.status_code) == (200, 200)
        assert api.stored()["events"] == []  # queued, for the shutdown to deliver
        assert_uvicorn_shut_down(app.stop())
    events = api.events()
    assert events[paid.json()["message_id"]] == (
        "user_8842",
        "payment_failed",
        {"amount_cents": 4900},
    )
    assert api.signals() == [
        ("user_1203", "export_requested", {}),
        ("user_8842", "payment_failed", {"amount_cents": 4900}),
    ]


@drives("In an aiohttp service #1")
def test_aiohttp_service(api: Api, tmp_path: Path) -> None:
    """Under web.run_app: the handler tracks; the cleanup context's teardown delivers it."""
    block = readme_block("In an aiohttp service #1")
    with aiohttp_serving(block, tmp_path, api.env(**LONG_INTERVAL)) as app, app.http() as http:
        answer = http.post("/cancel/user_8842")
        assert (answer.status_code, answer.json()) == (200, {"ok": True})
        assert api.stored()["events"] == []  # queued, for the teardown to deliver
        app.stop()
    assert api.signals() == [("user_8842", "subscription_cancelled", {})]


@drives("Without an event loop: WSGI, scripts, Celery, cron #1")
def test_without_an_event_loop(api: Api, tmp_path: Path) -> None:
    """A plain script: the sync Client delivers as the block ends; SIGTERM is handled."""
    block = readme_block("Without an event loop: WSGI, scripts, Celery, cron #1")
    checks = "import signal\nassert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)"
    run_block(block, tmp_path, api.env(), checks=checks)
    assert api.signals() == [("user_8842", "report_generated", {})]


@drives("Django #1")
@drives("Django #2")
def test_django(api: Api, tmp_path: Path) -> None:
    """settings.py and views.py in a minimal project: the system check passes; for a signed-in
    user both views track under WSGI and ASGI; for nobody nothing is sent."""
    settings_block, views_block = readme_block("Django #1"), readme_block("Django #2")
    save(settings_block, tmp_path / "settings.py")
    save(views_block, tmp_path / "views.py")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(SUPPORT / "django_project.py"), str(tmp_path)],
        cwd=tmp_path,
        env=api.env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = orjson.loads(line.removeprefix("RESULT "))
    assert result["statuses"] == {"wsgi": [204, 202], "asgi": [204, 202], "anonymous": [204, 202]}
    user = result["user"]
    assert api.signals() == sorted(
        [(user, "plan_upgraded", {"plan": "pro"}), (user, "export_requested", {})] * 2, key=repr
    )
    assert len(api.events()) == 4  # four events, each with its own $message_id
    assert result["stats"]["dropped_by_reason"] == {"anonymous": 2}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """redis-server on a free 127.0.0.1 port, in memory only (as tests/test_celery.py runs it)."""
    with redis_server(tmp_path / "redis") as url:
        yield url


@drives("Celery #1")
def test_celery(api: Api, tmp_path: Path, redis_url: str) -> None:
    """A prefork worker on the block (saved as tasks.py): one task through redis; its event
    arrives while the worker runs (setup() flushes after the task; the batch interval is 60 s),
    once."""
    celery = pytest.importorskip("celery", reason="the Celery block needs celery")
    block = readme_block("Celery #1")
    save(block, tmp_path / "tasks.py")
    command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=prefork"]
    command += ["--concurrency=1", "--without-heartbeat", "--without-mingle", "--without-gossip"]
    env = api.env(WHISPERR_FLUSH_INTERVAL="60", CELERY_BROKER_URL=redis_url)
    process = subprocess.Popen(
        [*command, "--loglevel=INFO"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    lines = Lines(process.stdout)
    sender = celery.Celery("readme-sender", broker=redis_url, set_as_current=False)
    try:
        assert lines.wait_for(lambda line: " ready." in line, START_TIMEOUT) is not None, (
            lines.text()
        )
        sender.send_task("tasks.send_receipt", args=["user_8842", "ord-1"])
        assert api.wait_for_events(1), f"no event arrived:\n{lines.text()}"
        process.send_signal(signal.SIGTERM)
        process.wait(STOP_TIMEOUT)
        lines.wait_for(lambda line: False, STOP_TIMEOUT)
        assert process.returncode == 0, lines.text()
        assert "Traceback" not in lines.text(), lines.text()
    finally:
        sender.close()
        stop(process)
        end_session(process)
        lines.close()
    assert api.events() == {"rcpt:ord-1": ("user_8842", "receipt_sent", {"order_id": "ord-1"})}


@drives("The current user in ASGI apps: Starlette and FastAPI #1")
def test_asgi_current_user(api: Api, tmp_path: Path) -> None:
    """Under uvicorn: for a signed-in request the route and its background task track for the
    user; for nobody nothing is sent; the middleware closes the client at shutdown."""
    block = readme_block("The current user in ASGI apps: Starlette and FastAPI #1")
    with uvicorn_serving(block, tmp_path, api.env(**LONG_INTERVAL)) as app, app.http() as http:
        signed_in = http.post("/exports", headers={"Authorization": "Bearer tok_ada"})
        anonymous = http.post("/exports")
        assert (signed_in.status_code, anonymous.status_code) == (200, 200)
        assert api.stored()["events"] == []  # queued, for the shutdown to deliver
        assert_uvicorn_shut_down(app.stop())
    assert api.signals() == [
        ("user_8842", "export_built", {}),
        ("user_8842", "export_requested", {"format": "csv"}),
    ]


@drives("The current user in aiohttp #1")
def test_aiohttp_current_user(api: Api, tmp_path: Path) -> None:
    """Under web.run_app: the session cookie's user is tracked for; nobody: nothing sent; the
    client setup() was given is closed (so delivered) at the cleanup."""
    block = readme_block("The current user in aiohttp #1")
    with aiohttp_serving(block, tmp_path, api.env(**LONG_INTERVAL)) as app, app.http() as http:
        signed_in = http.post("/features/export", headers={"Cookie": "session=sess_ada"})
        anonymous = http.post("/features/export")
        assert (signed_in.status_code, anonymous.status_code) == (202, 202)
        assert api.stored()["events"] == []  # queued, for the cleanup to deliver
        app.stop()
    assert api.signals() == [("user_8842", "feature_used", {"feature": "export"})]


# -- Settings, hooks and metrics --------------------------------------------------------------


@drives("Settings #1")
def test_truststore(api: Api, tmp_path: Path) -> None:
    """The client takes the operating system's trust store as `verify`, and delivers."""
    pytest.importorskip(
        "truststore",
        reason="truststore is the optional extra whisperr-async[truststore], not installed here",
    )
    checks = """
        import asyncio
        assert client.settings.verify.__class__ is truststore.SSLContext

        async def deliver():
            async with client:
                client.track("user_8842", "trust_checked")

        asyncio.run(deliver())
    """
    run_block(readme_block("Settings #1"), tmp_path, api.env(), checks=textwrap.dedent(checks))
    assert api.signals() == [("user_8842", "trust_checked", {})]


@drives("`before_send`: change, enrich or drop events in one place #1")
def test_before_send(api: Api, tmp_path: Path) -> None:
    """The hook drops the staff user's event (counted as filtered) and adds the region."""
    block = readme_block("`before_send`: change, enrich or drop events in one place #1")
    checks = """
        import asyncio

        async def deliver():
            async with client:
                client.track("staff_ada", "page_viewed", {"page": "/admin"})
                client.track("user_8842", "page_viewed", {"page": "/pricing"})
            assert client.stats().dropped_by_reason == {"filtered": 1}, client.stats()

        asyncio.run(deliver())
    """
    run_block(block, tmp_path, api.env(), checks=textwrap.dedent(checks))
    assert api.signals() == [("user_8842", "page_viewed", {"page": "/pricing", "region": "eu"})]


def metric_names() -> dict[str, tuple[str, set[str]]]:
    """The Prometheus names of the instruments whisperr/_metrics.py's docstring lists, as the
    OTLP-to-Prometheus translation spells them: each to (its OpenTelemetry name, attributes)."""
    import whisperr._metrics

    names: dict[str, tuple[str, set[str]]] = {}
    pattern = r"^\s+(whisperr\.[\w.]+)\s+(counter|up-down counter|histogram)\s+(\S+)\s+(.*)$"
    for name, kind, unit, what in re.findall(pattern, whisperr._metrics.__doc__ or "", re.M):
        base = name.replace(".", "_") + {"s": "_seconds", "By": "_bytes"}.get(unit, "")
        attributes = set(re.findall(r"\w+", what.rpartition(";")[2])) - {"attribute"}
        if ";" not in what:
            attributes = set()
        suffixes = {"counter": ["_total"], "up-down counter": [""]}
        for suffix in suffixes.get(kind, ["_bucket", "_sum", "_count"]):
            names[base + suffix] = (name, attributes | ({"le"} if suffix == "_bucket" else set()))
    assert len(names) >= 10, f"the docstring's table was not found: {names}"
    return names


def check_alert_rules(code: str) -> None:
    """Each rule follows its comment, names only instruments whisperr/_metrics.py lists (by
    their Prometheus names), with their attributes, and drop reasons the client has."""
    import whisperr._metrics
    from whisperr._config import DEFAULT_MAX_QUEUE_SIZE

    names = metric_names()
    package = Path(whisperr._metrics.__file__).parent  # the installed one (nox -s sdist)
    source = "\n".join(p.read_text() for p in package.glob("*.py"))
    lines = [line for line in code.splitlines() if line.strip()]
    assert lines, "no rule"
    assert len(lines) % 2 == 0, "a comment, then its rule"
    for comment, rule in zip(lines[0::2], lines[1::2], strict=True):
        assert comment.startswith("# "), f"a comment, then its rule: {comment}"
        assert not rule.startswith("#"), f"a comment, then its rule: {rule}"
        assert rule.count("(") == rule.count(")"), rule
        used = re.findall(r"\bwhisperr_\w+", rule)
        assert used, f"no whisperr metric in {rule}"
        for metric in used:
            assert metric in names, f"{metric} is not an instrument of whisperr._metrics"
        for metric, matchers in re.findall(r"\b(whisperr_\w+)\{([^}]*)\}", rule):
            for label, value in re.findall(r'(\w+)\s*[!=]~?\s*"([^"]*)"', matchers):
                assert label in names[metric][1], f"{metric} has no attribute {label}"
                if label == "reason":
                    for reason in value.split("|"):
                        assert f'"{reason}"' in source, f"no drop reason {reason!r}"
        for labels in re.findall(r"\bby \(([^)]*)\)", rule):
            for label in labels.split(","):
                assert all(label.strip() in names[m][1] for m in used), f"by {label}: {rule}"
        if queue := re.search(r"max_queue_size \(([\d,]+) by default\)", comment):
            assert int(queue[1].replace(",", "")) == DEFAULT_MAX_QUEUE_SIZE, comment
            [threshold] = re.findall(r"> (\d+)$", rule)
            assert 0 < int(threshold) < DEFAULT_MAX_QUEUE_SIZE, rule


@drives("OpenTelemetry metrics of the client #1")
def test_alert_rules() -> None:
    """The PromQL rules are about this client's instruments (see check_alert_rules)."""
    check_alert_rules(readme_block("OpenTelemetry metrics of the client #1").code)


@pytest.mark.parametrize(
    ("comment", "rule", "wrong"),
    [
        ("# Lost", "rate(whisperr_events_dropped_total[5m]) > 0", None),
        ("# Lost", "rate(whisperr_events_lost_total[5m]) > 0", "not an instrument"),
        ("# Lost", "rate(whisperr_events_dropped[5m]) > 0", "not an instrument"),  # no _total
        ("# Lost", 'rate(whisperr_events_retried_total{reason="x"}[5m]) > 0', "no attribute"),
        ("# Lost", 'rate(whisperr_events_dropped_total{reason!~"filtred"}[5m]) > 0', "reason"),
        ("# Lost", "sum by (outcome) (rate(whisperr_events_dropped_total[5m])) > 0", "by "),
        ("# towards max_queue_size (100,000 by default)", "max(whisperr_queue_events) > 5", None),
        ("# towards max_queue_size (10,000 by default)", "max(whisperr_queue_events) > 5", "#"),
        ("rate(whisperr_events_dropped_total[5m]) > 0", "# Lost", "a comment, then"),
    ],
)
def test_alert_rule_check(comment: str, rule: str, wrong: str | None) -> None:
    """The check passes good rules and names what is wrong with bad ones."""
    if wrong is None:
        check_alert_rules(f"{comment}\n{rule}\n")
    else:
        with pytest.raises(AssertionError, match=re.escape(wrong)):
            check_alert_rules(f"{comment}\n{rule}\n")


# -- Delivering now: send() -------------------------------------------------------------------


@drives("Delivering now: `send()` #1")
def test_send(api: Api, tmp_path: Path) -> None:
    """The event is stored, and the receipt says so; a server that refuses it (422, final)
    takes the except branch, with nothing stored."""
    block = readme_block("Delivering now: `send()` #1")
    output = run_block(block, tmp_path, api.env())
    [message_id] = api.events()
    assert api.signals() == [("user_8842", "payment_failed", {"amount_cents": 4900})]
    assert output.split() == ["stored:", message_id, "evt_00000001"]
    assert api.server.app.sent_ids() == {message_id}

    assert api.http.post("/_local/reset").status_code == 200
    api.server.app.faults.script([Fault.status(422)])
    assert run_block(block, tmp_path, api.env()).split() == ["not", "stored:", "422", "final"]
    assert api.events() == {}


@drives("Delivering now: `send()` #2")
def test_outbox_relay(api: Api, tmp_path: Path) -> None:
    """The first row is refused (422: final, marked failed), the second published: stored with
    its row id as $message_id and its creation time as occurred_at."""
    api.server.app.faults.script([Fault.status(422)])
    checks = """
        import json
        print(json.dumps({row.id: row.created_at.isoformat() for row in OUTBOX}))
    """
    output = run_block(
        readme_block("Delivering now: `send()` #2"),
        tmp_path,
        api.env(),
        checks=textwrap.dedent(checks),
    )
    statuses, created = output.splitlines()
    assert statuses == "{'ob-1': 'failed', 'ob-2': 'published'}"
    assert api.events() == {"ob-2": ("user_1203", "plan_upgraded", {"plan": "pro"})}
    [event] = api.stored()["events"]
    sent_at = datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00"))
    row_at = datetime.fromisoformat(orjson.loads(created)["ob-2"])
    assert abs((sent_at - row_at).total_seconds()) < 0.001  # milliseconds on the wire


@drives("Delivering now: `send()` #3")
def test_webhook(api: Api, tmp_path: Path) -> None:
    """Under uvicorn: 204 once the event is stored; 422 when the server refuses it for good."""
    block = readme_block("Delivering now: `send()` #3")
    with uvicorn_serving(block, tmp_path, api.env()) as app, app.http() as http:
        stored = http.post(
            "/webhooks/billing", json={"id": "wh_1", "customer": "cus_42", "amount": 4900}
        )
        assert stored.status_code == 204
        assert api.events() == {"wh_1": ("cus_42", "payment_failed", {"amount_cents": 4900})}
        api.server.app.faults.script([Fault.status(422)])
        refused = http.post("/webhooks/billing", json={"id": "wh_2", "customer": "c", "amount": 1})
        assert refused.status_code == 422
        assert_uvicorn_shut_down(app.stop())
    assert set(api.events()) == {"wh_1"}


# -- Testing your code, the bundled local server, migrating, developing ----------------------

PLUGIN_TESTS = Path(__file__).resolve().parent / "test_pytest_plugin.py"


def contains_verbatim(text: str, code: str) -> bool:
    """Whether `text` holds the lines of `code` in a row, each under the same indentation."""
    want, have = code.rstrip("\n").splitlines(), text.splitlines()
    for start, line in enumerate(have):
        if not line.endswith(want[0]) or line[: -len(want[0])].strip():
            continue
        indent = line[: -len(want[0])]
        window = have[start : start + len(want)]
        if len(window) == len(want) and all(
            got == indent + line or (not line.strip() and not got.strip())
            for got, line in zip(window, want, strict=True)
        ):
            return True
    return False


@drives("Testing your code #*")
@pytest.mark.parametrize("block", blocks_under("Testing your code"), ids=lambda b: b.key)
def test_testing_your_code(block: Block) -> None:
    """tests/test_pytest_plugin.py (pytester) runs each of these blocks verbatim."""
    assert PLUGIN_TESTS.exists(), f"{block}: {PLUGIN_TESTS.name}, which runs it, is missing"
    assert contains_verbatim(PLUGIN_TESTS.read_text(), block.code), (
        f"{block} is not in {PLUGIN_TESTS.name} verbatim"
    )


def test_contains_verbatim() -> None:
    code = "def f():\n    return 1\n\nx = f()\n"
    assert contains_verbatim(f'CODE = """\n{code}"""\n', code)
    assert contains_verbatim("    " + code.replace("\n", "\n    "), code)
    assert not contains_verbatim(code.replace("return 1", "return 2"), code)
    assert not contains_verbatim("def f():\n  return 1\n\nx = f()\n", code)


@drives("A durable spool on disk #1")
@drives("A durable spool on disk #2")
def test_spool(api: Api, tmp_path: Path) -> None:
    """The block run while the API is down spools its event; run again with the API up it
    delivers both, the spooled one first. The tool's commands then run on that file (after one
    more event was spooled): it shows it, replays it, exports and purges."""
    block = readme_block("A durable spool on disk #1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    script = save(block, tmp_path / "spool_block.py")

    def run(base_url: str) -> subprocess.CompletedProcess[str]:
        env = base_env(WHISPERR_API_KEY=API_KEY, WHISPERR_BASE_URL=base_url)
        return subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip

    first = run(down)
    assert first.returncode == 0, first
    assert first.stdout == "delivered=0 spooled=1 replayed=0\n", first
    assert (tmp_path / "whisperr-spool.db").stat().st_mode & 0o777 == 0o600
    second = run(api.url)
    assert second.returncode == 0, second
    assert second.stdout == "delivered=2 spooled=0 replayed=1\n", second
    assert api.signals() == [("user_8842", "payment_failed", {"amount_cents": 4900})] * 2
    ordered = sorted(api.stored()["events"], key=lambda e: str(e["occurred_at"]))
    assert len({e["context"]["$message_id"] for e in ordered}) == 2

    api.http.post("/_local/reset")
    assert run(down).returncode == 0  # one event in the file again
    outputs = []
    for command in console_commands(readme_block("A durable spool on disk #2")):
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "whisperr.spool"], command
        stdout = None
        if ">" in words:
            stdout = (tmp_path / words[-1]).open("w")
            words = words[: words.index(">")]
        try:
            done = subprocess.run(
                [sys.executable, *words[1:]],
                cwd=tmp_path, env=api.env(), stdout=stdout or subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT,
            )  # fmt: skip
        finally:
            if stdout is not None:
                stdout.close()
        assert done.returncode == 0, f"{command}: {done}"
        assert API_KEY not in (done.stdout or "") + done.stderr
        outputs.append(done.stdout or "")
    assert re.search(r"^events: 1$", outputs[0], re.M), outputs[0]  # shown
    assert len(api.stored()["events"]) == 1  # replayed
    assert (tmp_path / "spooled.jsonl").read_text() == ""  # exported: nothing left after it
    assert outputs[3].strip() == "purged 0 events", outputs[3]


@drives("The bundled local server #1")
def test_local_server_commands(tmp_path: Path) -> None:
    """The server's commands run (on a free port), and an app pointed at it delivers there."""
    check_console(readme_block("The bundled local server #1"), tmp_path)


@drives("The bundled local server #2")
def test_local_server_faults(tmp_path: Path) -> None:
    """Scripted faults, then a seeded mix: the block's own asserts hold (every event stored
    once) and it prints the statuses it says; the client's retry warnings are all it logs."""
    script = save(readme_block("The bundled local server #2"), tmp_path / "faults.py")
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    assert done.returncode == 0, output
    assert done.stdout.splitlines()[0] == "[503, None, None, 202]", output
    assert all(line.startswith("whisperr: ") for line in done.stderr.splitlines()), output


@drives("Migrating from the official SDK #1")
def test_migrating(api: Api, tmp_path: Path) -> None:
    """The official SDK's code, on this engine: both events and the identify are delivered."""
    run_block(readme_block("Migrating from the official SDK #1"), tmp_path, api.env())
    assert api.signals() == [
        ("user_8842", "membership_started", {"plan_id": "pro_monthly"}),
        ("user_8842", "payment_failed", {"amount_cents": 4900}),
    ]
    [identify] = api.stored()["identifies"]
    assert identify["external_user_id"] == "user_8842"
    assert identify["traits"] == {"plan": "pro"}
    assert identify["channels"][0]["address"] == "ada@example.com"


@drives("Developing #1")
def test_developing(tmp_path: Path) -> None:
    """The nox sessions named exist, and `-k faults` selects tests."""
    check_console(readme_block("Developing #1"), tmp_path)


@pytest.mark.skipif(
    not (ROOT / "benchmarks").is_dir(),
    reason="benchmarks/ is not in this tree (the sdist leaves it out): no script to ask",
)
def test_inline_benchmark_commands() -> None:
    """The benchmark commands quoted in the prose (`python benchmarks/x.py --flag ...`) name
    scripts that exist, with flags their --help lists."""
    prose = re.sub(r"^```.*?^```$", "", README.read_text(), flags=re.S | re.M)
    quoted = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    commands = [span for span in quoted if re.search(r"benchmarks/\w+\.py", span)]
    assert len(commands) >= 4, commands
    for command in commands:
        words = command.split()
        [script] = [w for w in words if re.fullmatch(r"benchmarks/\w+\.py", w)]
        flags = [w for w in words[words.index(script) + 1 :] if w.startswith("-")]
        check_script_flags(script, flags)


# -- console commands -------------------------------------------------------------------------


def console_commands(block: Block) -> list[str]:
    """The commands of a console block: its `$ ` lines, without the prompt."""
    lines = block.code.splitlines()
    stray = [line for line in lines if line.strip() and not line.startswith("$ ")]
    assert not stray, f"{block}: lines that are not commands: {stray}"
    return [line[2:] for line in lines if line.strip()]


@dataclass
class Console:
    """What the commands of one console block started, so that later commands can use it."""

    tmp_path: Path
    servers: dict[str, str] = field(default_factory=dict)  # the README's URL -> the real one
    processes: list[tuple[subprocess.Popen[str], Lines]] = field(default_factory=list)


def check_console(block: Block, tmp_path: Path) -> None:
    """Check (or run) every command of a console block; see the module's docstring."""
    console = Console(tmp_path)
    try:
        for line in console_commands(block):
            words = shlex.split(line, comments=True)
            while words:
                simple = words[: words.index("&&")] if "&&" in words else words
                words = words[len(simple) + 1 :]
                check_command(simple, console, f"{block}: {line}")
    finally:
        for process, lines in console.processes:
            stop(process)
            lines.close()


@pytest.mark.parametrize(
    "command",
    [
        "python -m nox -s nosuch",
        "python -m nox -s tests-2.7",
        "python -m nox -s tests-3.12 -- -k nosuchtest",
        "python -m nox -s lint -- -k faults",
        "python -m pip install --nosuch .",
        "python -m pip install requests",
        "python benchmarks/run.py --nosuch",
        "python benchmarks/nosuch.py",
        "python -m whisperr.server --nosuch",
        "make install",
        "python -m pip install . && make install",
    ],
)
def test_console_check_fails(command: str, tmp_path: Path) -> None:
    """A command that is not real, or that no check knows, fails its block."""
    block = Block("Console", 1, "console", 1, f"$ {command}\n")
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_console(block, tmp_path)


def check_command(words: list[str], console: Console, where: str) -> None:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:1] == ["python"], f"{where}: no check for {shlex.join(words)!r}"
    args = words[1:]
    if args[:3] == ["-m", "pip", "install"]:
        check_pip_install(args[3:], where)
    elif args[:2] == ["-m", "nox"]:
        check_nox(args[2:], where)
    elif args[:2] == ["-m", "whisperr.server"]:
        start_local_server(args[2:], console, where)
    elif args and re.fullmatch(r"benchmarks/\w+\.py", args[0]):
        check_script_flags(args[0], [a for a in args[1:] if a.startswith("-")])
    elif args == ["your_app.py"] and env:
        run_your_app(env, console, where)
    else:
        pytest.fail(f"{where}: no check for {shlex.join(words)!r}")


@functools.cache
def pip_install_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    ).stdout


def check_pip_install(args: list[str], where: str) -> None:
    """Options pip's `install --help` lists; `.` (this project) or nox (what noxfile.py uses)."""
    for option in [a for a in args if a.startswith("-")]:
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", pip_install_help()), (
            f"{where}: pip install has no option {option}"
        )
    for target in [a for a in args if not a.startswith("-")]:
        if target == ".":  # the repository's root is a project that installs `whisperr`
            project = (ROOT / "pyproject.toml").read_text()
            assert "[build-system]" in project
            assert 'name = "whisperr-async"' in project
            assert 'packages = ["whisperr"]' in project
        elif target == "nox":
            assert re.search(r"^import nox$", (ROOT / "noxfile.py").read_text(), re.M), where
        else:
            pytest.fail(f"{where}: no check for installing {target!r}")


def nox_sessions() -> tuple[set[str], list[str]]:
    """The sessions noxfile.py defines (also as name-X.Y for each python), and its defaults."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    lists: dict[str, Any] = {}  # the constant lists of the module, such as PYTHONS
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            with contextlib.suppress(ValueError):
                value = ast.literal_eval(node.value)
                lists |= {t.id: value for t in node.targets if isinstance(t, ast.Name)}
    sessions: set[str] = set()
    defaults: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "nox.options.sessions":
            defaults = ast.literal_eval(node.value)
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            if ast.unparse(call.func if call else decorator) != "nox.session":
                continue
            sessions.add(node.name)
            for keyword in call.keywords if call else []:
                if keyword.arg == "python":
                    value = keyword.value
                    pythons = lists[value.id] if isinstance(value, ast.Name) else None
                    pythons = ast.literal_eval(value) if pythons is None else pythons
                    pythons = [pythons] if isinstance(pythons, str) else pythons
                    sessions.update(f"{node.name}-{python}" for python in pythons)
    assert sessions, "no @nox.session in noxfile.py"
    return sessions, defaults


def check_nox(args: list[str], where: str) -> None:
    """`-s` names sessions of noxfile.py (none: its defaults exist); `-- -k X` selects tests."""
    sessions, defaults = nox_sessions()
    posargs = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    named = args[1:] if args[:1] in (["-s"], ["--sessions"]) else None
    assert named != [], f"{where}: -s without a session"
    assert named is not None or not args, f"{where}: no check for {args}"
    for session in named or defaults:
        assert session in sessions, f"{where}: noxfile.py has no session {session!r}"
    if posargs:
        assert named, f"{where}: arguments for the default sessions: {posargs}"
        assert all(s.startswith("tests") for s in named), f"{where}: {posargs} for {named}"
        assert posargs[:1] == ["-k"], f"{where}: no check for {posargs}"
        assert len(posargs) == 2, f"{where}: no check for {posargs}"
        words = set(re.findall(r"\w+", posargs[1])) - {"and", "or", "not"}
        names = "\n".join(
            [p.stem for p in (ROOT / "tests").glob("test_*.py")]
            + re.findall(r"^\s*(?:async )?def (test_\w+)", read_tests(), re.M)
        )
        for word in words:
            assert word in names, f"{where}: -k {posargs[1]} selects no test"


def read_tests() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))


def check_script_flags(script: str, flags: list[str]) -> None:
    """The script exists, and its --help lists each flag."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    done = subprocess.run(
        [sys.executable, str(path), "--help"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{script} --help: {done.stderr}"
    for flag in flags:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", done.stdout), (
            f"{script} has no flag {flag}:\n{done.stdout}"
        )


def batch(n: int = 1) -> bytes:
    """A valid batch of `n` events, each with its own $message_id."""
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event: dict[str, Any] = {"external_user_id": "user_8842", "event_type": "server_checked"}
    event |= {"occurred_at": now, "properties": {}}
    events = [{**event, "context": {"$message_id": str(uuid.uuid4())}} for _ in range(n)]
    return orjson.dumps({"events": events})


def start_local_server(args: list[str], console: Console, where: str) -> None:
    """Start `python -m whisperr.server ARGS` (on a free port instead of --port's) and check
    that it serves: with --api-key it takes that key only; with --fault-mix some of 40 requests
    fail, in the ways the mix names."""
    args = list(args)
    readme_url = None
    if "--port" in args:
        index = args.index("--port") + 1
        readme_url, args[index] = f"http://127.0.0.1:{args[index]}", "0"
    else:
        args += ["--port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "whisperr.server", *args],
        cwd=console.tmp_path,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = Lines(process.stdout)
    console.processes.append((process, lines))
    started = lines.wait_for(lambda line: "http://127.0.0.1:" in line, START_TIMEOUT)
    assert started is not None, f"{where}: the server did not start:\n{lines.text()}"
    found = re.search(r"http://127\.0\.0\.1:\d+", lines.lines[started])
    assert found is not None
    url = found[0]
    if readme_url is not None:
        console.servers[readme_url] = url
    key = args[args.index("--api-key") + 1] if "--api-key" in args else None
    headers = {"Content-Type": "application/json", "X-API-Key": key or "wrk_any"}
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
        if key is not None:
            refused = http.post(
                "/v1/events/batch", content=batch(), headers=headers | {"X-API-Key": "wrk_other"}
            )
            assert refused.status_code == 401, f"{where}: another key was taken"
        if "--fault-mix" not in args:
            assert (
                http.post("/v1/events/batch", content=batch(), headers=headers).status_code == 202
            )
            return
    mix = args[args.index("--fault-mix") + 1]
    codes = {int(code) for code in re.findall(r"(?:^|,)(\d{3})", mix)}
    outcomes: list[int | str] = []
    for _ in range(40):  # a connection of its own each: a fault may close it
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
            try:
                outcomes.append(
                    http.post("/v1/events/batch", content=batch(), headers=headers).status_code
                )
            except httpx.TransportError:
                outcomes.append("closed")
    assert 202 in outcomes, f"{where}: no request succeeded: {outcomes}"
    faults = {o for o in outcomes if o != 202}
    assert faults, f"{where}: no fault in 40 requests: {outcomes}"
    allowed: set[int | str] = set(codes)
    if "close" in mix or "lost_ack" in mix:
        allowed.add("closed")
    assert faults <= allowed, f"{where}: faults not in the mix: {outcomes}"


YOUR_APP = """\
import whisperr

with whisperr.Client() as client:
    client.track("user_8842", "app_started")
"""


def run_your_app(env: dict[str, str], console: Console, where: str) -> None:
    """`your_app.py`, a stand-in app, with the line's variables (its URL: the server started
    for it above): the server stores its event."""
    mapped = dict(env)
    for readme_url, url in console.servers.items():
        mapped = {k: v.replace(readme_url, url) for k, v in mapped.items()}
    [url] = {v for v in mapped.values() if v.startswith("http://")}
    assert url in console.servers.values(), f"{where}: no server was started at {url}"
    (console.tmp_path / "your_app.py").write_text(YOUR_APP)
    done = subprocess.run(
        [sys.executable, "-W", "error", "your_app.py"],
        cwd=console.tmp_path,
        env=base_env(**mapped),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), f"{where}: {done.stderr}"
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
        stored = orjson.loads(http.get("/_local/events").content)["events"]
    assert [e["event_type"] for e in stored if e["event_type"] == "app_started"] == ["app_started"]
