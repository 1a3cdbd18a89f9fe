"""whisperr.celery with the real thing: a prefork Celery worker, a redis-server, the local server.

Each case starts redis-server on a free 127.0.0.1 port (once for the module) and the bundled
ingestion server in this process, then a `celery worker --pool=prefork --concurrency=2`
subprocess on an app module: examples/celery_app.py (the module-level client, the path most
users take) or a probe app written to tmp_path (a sync client made in the master, or
`whisperr.init()` in each pool process; `setup()` or not). The test sends tasks through the
broker, waits for their results, stops the worker with SIGTERM and reads what the server
stored (one copy per `$message_id`) and what arrived on the wire (the events of every request
it answered, to show nothing was sent twice).

Every worker runs with WHISPERR_FLUSH_INTERVAL=60: no batch goes out on its timer during a
test, so what arrives while the worker runs was flushed after its task, and what arrives only
when the worker stops was delivered as its pool process ended.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from whisperr.server import LocalServer, create_app

from .test_lifecycle import Lines, clean_env, end_session, redis_server, stop

pytest.importorskip("celery", reason="whisperr.celery needs celery (the test group has it)")
redis = pytest.importorskip("redis", reason="the broker client: celery[redis]")
from celery import Celery  # noqa: E402  (after the skip above)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Celery's prefork pool forks")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
API_KEY = "wrk_local"
TASKS = 20
START_TIMEOUT = 20.0  # for redis-server, or a worker to log "ready."
RESULT_TIMEOUT = 20.0  # for all the results of one run
FLUSHED_WITHIN = 5.0  # for the events to arrive once the results are in (the interval is 60 s)
STOP_TIMEOUT = 20.0  # for a worker to end after SIGTERM: its pool processes deliver as they end

PROBE_APP = '''\
"""A Celery app for tests/test_celery.py; PROBE_KIND says which client, PROBE_SETUP if set up."""

import os

from celery import Celery, signals

import whisperr
import whisperr.celery

app = Celery(
    "probe_app",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
KIND = os.environ["PROBE_KIND"]
client = None
if KIND == "client":
    client = whisperr.Client()
elif KIND == "whisperr":
    client = whisperr.Whisperr()
else:  # "init_in_child": the module-level client, made in each pool process

    @signals.worker_process_init.connect(weak=False)
    def init_client(**_):
        whisperr.init()


if client is not None:
    # Tracked in the master, before it forks its pool: still queued then (a 60 s interval).
    client.track("master", "worker_started", message_id=f"master-{os.getpid()}")
if os.environ["PROBE_SETUP"] == "1":
    whisperr.celery.setup(app, client)


@signals.worker_process_shutdown.connect(weak=False)  # after setup's own receiver
def report_state(**_):
    tracker = whisperr.get_client() if client is None else client
    tracker = tracker.client if KIND == "whisperr" else tracker
    os.write(2, f"PROBE at the end of {os.getpid()}: {tracker!r}\\n".encode())


@app.task
def track(n):
    tracker = whisperr.get_client() if client is None else client
    before = tracker.stats()
    tracker.track(f"user_{n}", "task_done", {"n": n}, message_id=f"task-{n}")
    return {"pid": os.getpid(), "tracked": before.tracked, "queued": before.queued}
'''


# -- redis-server, the ingestion server, a worker -----------------------------------------------


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis-server on a free 127.0.0.1 port, in memory only; skipped if it cannot run."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer(create_app(api_key=API_KEY)) as running:
        yield running


@pytest.fixture
def sender(broker_url: str) -> Iterator[Celery]:
    """A Celery app of this process that sends tasks by name and reads their results."""
    client = redis.Redis.from_url(broker_url)
    client.flushall()  # no message or result of an earlier case
    client.close()
    app = Celery("whisperr-test-sender", broker=broker_url, backend=broker_url)
    try:
        yield app
    finally:
        app.close()


class Worker:
    """A `celery worker` subprocess, in a session of its own, with its log read as it comes."""

    def __init__(self, process: subprocess.Popen[str], lines: Lines) -> None:
        self.process, self.lines = process, lines

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown) and wait for the exit; the test fails past a bound."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {STOP_TIMEOUT} s:\n{self.lines.text()}")
        assert self.process.returncode == 0, self.lines.text()
        self.lines.wait_for(lambda line: False, STOP_TIMEOUT)  # read the log to its end

    def assert_clean_log(self) -> None:
        """No signal receiver raised, and whisperr logged no warning or error."""
        text = "\n".join(self.lines.lines)
        assert "Signal handler" not in text, text
        assert "Traceback" not in text, text
        assert not re.search(r"(WARNING|ERROR|CRITICAL)/[^\]]*\] whisperr", text), text


@contextlib.contextmanager
def worker(
    workdir: Path, module: str, broker_url: str, server: LocalServer, *options: str, **env: str
) -> Iterator[Worker]:
    """Run `celery -A module worker` in `workdir` until the block ends; always gone after it."""
    command = [sys.executable, "-m", "celery", "-A", module, "worker", "--pool=prefork"]
    command += ["--concurrency=2", "--without-heartbeat", "--without-mingle", "--without-gossip"]
    command += ["--loglevel=INFO", *options]
    environment = clean_env(
        WHISPERR_API_KEY=API_KEY,
        WHISPERR_BASE_URL=server.url,
        WHISPERR_FLUSH_INTERVAL="60",
        WHISPERR_SHUTDOWN_TIMEOUT="5",
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=broker_url,
        **env,
    )
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that no pool process outlives the case
    )
    assert process.stdout is not None
    lines = Lines(process.stdout)
    try:
        ready = lines.wait_for(lambda line: " ready." in line, START_TIMEOUT)
        assert ready is not None, f"the worker did not start:\n{lines.text()}"
        yield Worker(process, lines)
    finally:
        stop(process)
        end_session(process)
        lines.close()


def run_tasks(sender: Celery, name: str, args: list[list[Any]]) -> list[Any]:
    """Send one task per args through the broker; their results, within RESULT_TIMEOUT."""
    results = [sender.send_task(name, args=a) for a in args]
    deadline = time.monotonic() + RESULT_TIMEOUT
    return [r.get(timeout=max(deadline - time.monotonic(), 0.1)) for r in results]


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stored(server: LocalServer) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """The stored events by `$message_id`: (user, type, properties)."""
    return {
        e["context"]["$message_id"]: (e["external_user_id"], e["event_type"], e["properties"])
        for e in server.app.events
    }


def on_the_wire(server: LocalServer) -> int:
    """Events in every request the server answered, duplicates included."""
    return sum(r.events for r in server.app.requests if r.path.startswith("/v1/events/"))


def probe_app(tmp_path: Path) -> Path:
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    return tmp_path


# -- the example: the module-level client, set up --------------------------------------------


def receipts(n: int) -> list[list[Any]]:
    return [[f"user_{i % 7}", f"ord-{i:04d}", 100 * (i + 1)] for i in range(n)]


def expected_receipts(n: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {
        f"receipt:{order}": (user, "receipt_sent", {"order_id": order, "amount_cents": cents})
        for user, order, cents in receipts(n)
    }


def test_example_with_recycled_pool_processes(
    broker_url: str, server: LocalServer, sender: Celery
) -> None:
    """--max-tasks-per-child=1: every task in a pool process of its own; each event once."""
    with worker(EXAMPLES, "celery_app", broker_url, server, "--max-tasks-per-child=1") as w:
        results = run_tasks(sender, "celery_app.send_receipt", receipts(TASKS))
        w.stop()
        w.assert_clean_log()
    pids = [r["pid"] for r in results]
    assert len(set(pids)) == TASKS
    assert w.pid not in pids
    assert stored(server) == expected_receipts(TASKS)
    assert on_the_wire(server) == TASKS


def test_example_flushes_after_each_task(
    broker_url: str, server: LocalServer, sender: Celery
) -> None:
    """Long-lived pool processes: the events arrive while the worker runs, not at its stop."""
    with worker(EXAMPLES, "celery_app", broker_url, server) as w:
        results = run_tasks(sender, "celery_app.send_receipt", receipts(TASKS))
        flushed = wait_until(lambda: len(server.app.events) == TASKS, FLUSHED_WITHIN)
        assert flushed, f"{len(server.app.events)} of {TASKS} events arrived:\n{w.lines.text()}"
        w.stop()
        w.assert_clean_log()
    assert len({r["pid"] for r in results}) <= 2  # the same two pool processes throughout
    assert stored(server) == expected_receipts(TASKS)
    assert on_the_wire(server) == TASKS


# -- a probe app: each kind of client, and the fork --------------------------------------------


@pytest.mark.parametrize("kind", ["client", "whisperr", "init_in_child"])
def test_pool_processes_start_clean_and_deliver(
    broker_url: str, server: LocalServer, sender: Celery, tmp_path: Path, kind: str
) -> None:
    """A pool process starts with an empty queue and counters of its own, and setup() closes
    its client as it ends; an event the master had queued before forking is delivered once,
    by the master."""
    with worker(
        probe_app(tmp_path), "probe_app", broker_url, server, "--max-tasks-per-child=1",
        PROBE_KIND=kind, PROBE_SETUP="1",
    ) as w:  # fmt: skip
        results = run_tasks(sender, "probe_app.track", [[n] for n in range(TASKS)])
        w.stop()
        w.assert_clean_log()
    assert [(r["tracked"], r["queued"]) for r in results] == [(0, 0)] * TASKS
    ends = [line for line in w.lines.lines if line.startswith("PROBE at the end of ")]
    assert len(ends) >= TASKS  # and the two fresh pool processes left at the stop
    assert all(line.endswith(" closed>") or " closed " in line for line in ends), ends
    assert len({r["pid"] for r in results}) == TASKS
    expected = {f"task-{n}": (f"user_{n}", "task_done", {"n": n}) for n in range(TASKS)}
    if kind != "init_in_child":
        expected[f"master-{w.pid}"] = ("master", "worker_started", {})
    assert stored(server) == expected
    assert on_the_wire(server) == len(expected)


def test_without_setup_events_wait_for_the_pool_process_end(
    broker_url: str, server: LocalServer, sender: Celery, tmp_path: Path
) -> None:
    """No setup(): nothing is lost (a pool process ends with os._exit, which delivers first),
    but nothing arrives before the pool processes end, at the worker's stop."""
    with worker(
        probe_app(tmp_path), "probe_app", broker_url, server, PROBE_KIND="client", PROBE_SETUP="0"
    ) as w:
        run_tasks(sender, "probe_app.track", [[n] for n in range(TASKS)])
        assert server.app.events == []
        w.stop()
        w.assert_clean_log()
    ends = [line for line in w.lines.lines if line.startswith("PROBE at the end of ")]
    assert len(ends) >= 2
    assert not any(" closed" in line for line in ends), ends  # closed later, by os._exit
    assert len(stored(server)) == TASKS + 1
    assert on_the_wire(server) == TASKS + 1


# -- the module itself ----------------------------------------------------------------------


def test_import_whisperr_does_not_import_celery() -> None:
    """`import whisperr` leaves Celery alone; `whisperr.celery` imports the real celery."""
    code = (
        "import sys, whisperr\n"
        "assert 'celery' not in sys.modules, 'import whisperr imported celery'\n"
        "import os, whisperr.celery, celery, celery.signals\n"
        "assert whisperr.celery.signals is celery.signals\n"
        "assert not celery.__file__.startswith(os.path.dirname(whisperr.__file__)), celery\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr


EAGER = """\
import sys

from celery import Celery

import whisperr
import whisperr.celery

app = Celery("eager")
client = whisperr.Client(api_key=sys.argv[1], base_url=sys.argv[2], flush_interval=60)
whisperr.celery.setup(app, client)


@app.task
def track(n):
    client.track("user_1", "eager_done", {"n": n}, message_id=f"eager-{n}")


track.apply(args=(1,))
print("queued after apply:", client.stats().queued)
"""


def test_eager_task_is_not_flushed_after(server: LocalServer) -> None:
    """An eager task (apply()) runs in the caller, which is not blocked: its client delivers
    the event as usual (here at exit)."""
    done = subprocess.run(
        [sys.executable, "-c", EAGER, API_KEY, server.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "queued after apply: 1" in done.stdout
    assert stored(server) == {"eager-1": ("user_1", "eager_done", {"n": 1})}


def test_setup_refuses_what_is_not_a_client() -> None:
    import whisperr
    import whisperr.celery

    app = Celery("whisperr-test-refuses")
    with pytest.raises(TypeError, match="needs a whisperr client"):
        whisperr.celery.setup(app, whisperr)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be negative"):
        whisperr.celery.setup(app, flush_timeout=-1)
    app.close()


def test_each_task_runs_in_a_scope_of_its_own() -> None:
    """A bind_user() in one task never carries over to the next task of the same process.

    Celery's own signals, sent as a worker sends them around each task (no worker needed)."""
    from celery import signals

    import whisperr
    import whisperr.celery

    app = Celery("scoped", set_as_current=False)

    @app.task
    def job() -> None: ...

    whisperr.celery.setup(app, whisperr.Client(disabled=True))
    assert whisperr.current_scope() is None

    def around(task_id: str, body: Callable[[], None]) -> None:
        signals.task_prerun.send(sender=job, task_id=task_id, task=job, args=(), kwargs={})
        body()
        signals.task_postrun.send(
            sender=job, task_id=task_id, task=job, args=(), kwargs={}, retval=None, state="OK"
        )

    around("a", lambda: whisperr.bind_user("alice"))
    seen: list[object] = []
    around("b", lambda: seen.append(whisperr.current_scope()))
    assert seen == [whisperr.RequestScope()]  # its own, nobody signed in: not alice
    assert whisperr.current_scope() is None  # and nothing left bound after the tasks
