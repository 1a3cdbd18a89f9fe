"""The spool's store (whisperr._spool) on real SQLite files, and its command line.

Time is injected wherever the behaviour depends on it; the processes are real (subprocesses
of this interpreter, and os.fork), and every wait on one is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import whisperr
from whisperr import _events as ev
from whisperr._spool import (
    ROW_OVERHEAD,
    SCHEMA_VERSION,
    Added,
    Spool,
    SpoolBusy,
    SpoolError,
)

NOW = 1_781_438_400.0
BIG = 1 << 40  # a max_bytes that never evicts
API_KEY = "wrk_test_secret_key_0123456789"
RUN_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parent.parent


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def track(n: int, stamp: float = NOW, *, size: int = 0) -> ev.Item:
    return (f"user{n}", "page_view", stamp, b'{"n":%d,"pad":"%b"}' % (n, b"x" * size), f"m{n}")


def identify(user: str, stamp: float = NOW) -> ev.Item:
    return (user, None, stamp, b'{"external_user_id":"%b"}' % user.encode(), "")


def stored_size(item: ev.Item) -> int:
    context = item[5] if len(item) > 5 else b""
    return (
        len(item[3]) + len(context) + len(item[0]) + len(item[4]) + len(item[1] or "")
        + ROW_OVERHEAD
    )  # fmt: skip


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "spool.db")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(path: str, clock: Clock) -> Iterator[Spool]:
    made = Spool.open(path, max_bytes=BIG, clock=clock)
    assert made is not None
    yield made
    made.close()


def other(path: str, clock: Callable[[], float] | None = None, **kwargs: float) -> Spool:
    """A second owner on the same file."""
    made = Spool.open(path, max_bytes=int(kwargs.pop("max_bytes", BIG)), clock=clock or Clock())
    assert made is not None
    return made


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=_env(),
        cwd=REPO,
        check=False,
    )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPERR_")}
    return env | {"PYTHONPATH": str(REPO), "WHISPERR_API_KEY": API_KEY}


class TestAddAndClaim:
    def test_claim_hands_out_rows_oldest_first(self, spool: Spool) -> None:
        """Rows come back by occurred_at, whatever order they were added in, limit at a time."""
        items = [track(n, NOW - n) for n in range(10)]
        assert spool.add(items, owned=False) == Added(10, [])
        first, second = spool.claim(4), spool.claim(100)
        assert first.items == sorted(items, key=lambda item: item[2])[:4]
        assert second.items == sorted(items, key=lambda item: item[2])[4:]
        assert first.expired == second.expired == []

    def test_items_round_trip_whole(self, spool: Spool) -> None:
        """A track with a context, one without and an identify come back as they were added."""
        items = [
            ("u", "signup", NOW - 2, b'{"plan":"pro"}', "m1", b'{"ip":"10.0.0.1"}'),
            ("u", "login", NOW - 1, b"{}", "m2"),
            identify("u", NOW),
        ]
        spool.add(items, owned=False)
        assert spool.claim(10).items == items

    def test_rows_claimed_once_are_not_handed_out_again(self, spool: Spool) -> None:
        """A second claim by the same owner does not return what the first one took."""
        spool.add([track(n) for n in range(3)], owned=False)
        assert len(spool.claim(10).items) == 3
        assert spool.claim(10).items == []

    def test_own_write_ahead_rows_are_never_handed_back(self, spool: Spool) -> None:
        """Rows added with owned=True are this owner's copies of what it holds: claim skips them."""
        spool.add([track(1)], owned=True)
        spool.add([track(2)], owned=False)
        assert [item[4] for item in spool.claim(10).items] == ["m2"]

    def test_a_live_owners_rows_are_not_claimable(self, spool: Spool, path: str) -> None:
        """Another owner gets nothing of a live owner's rows, until it releases them."""
        spool.add([track(n) for n in range(5)], owned=True)
        thief = other(path)
        assert thief.claim(10).items == []
        spool.release()
        assert len(thief.claim(10).items) == 5
        thief.close()

    def test_release_frees_claimed_rows(self, spool: Spool, path: str) -> None:
        """Rows an owner claimed and did not deliver go back to anyone at release."""
        spool.add([track(n) for n in range(3)], owned=False)
        spool.claim(10)
        second = other(path)
        assert second.claim(10).items == []
        spool.release()
        assert len(second.claim(10).items) == 3
        assert second.info().owners == 1  # the released owner's entry is gone
        second.close()

    def test_rows_survive_a_reopen(self, spool: Spool, path: str) -> None:
        """What was added is in the file: a new Spool on it claims it (after a release)."""
        spool.add([track(n) for n in range(3)], owned=True)
        spool.release()
        spool.close()
        again = other(path)
        assert len(again.claim(10).items) == 3
        again.close()

    def test_two_owners_in_threads_never_share_a_row(self, spool: Spool, path: str) -> None:
        """Two Spool objects on one file claiming at once: every row goes to exactly one."""
        spool.add([track(n, NOW - n) for n in range(2000)], owned=False)
        owners = [spool, other(path)]
        got: list[list[str]] = [[], []]
        start = threading.Barrier(2, timeout=10)

        def drain(index: int) -> None:
            start.wait()
            while True:
                try:
                    claim = owners[index].claim(20)
                except SpoolBusy:
                    continue
                if not claim.items:
                    return
                got[index].extend(item[4] for item in claim.items)

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        owners[1].close()
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == sorted(f"m{n}" for n in range(2000))

    def test_two_processes_never_share_a_row(self, spool: Spool, path: str) -> None:
        """Two live processes claiming 5,000 rows from one file at once: union all, overlap
        none."""
        count = 5000
        now = time.time()
        spool.add([track(n, now - n / 1000) for n in range(count)], owned=False)
        code = """
            import json, sys, time
            from whisperr._spool import Spool, SpoolBusy
            spool = Spool.open(sys.argv[1], max_bytes=1 << 40)
            print("ready", flush=True)
            sys.stdin.readline()
            started, got = time.monotonic(), []
            while True:
                try:
                    claim = spool.claim(25)
                except SpoolBusy:
                    continue
                if not claim.items:
                    break
                got.extend(item[4] for item in claim.items)
            print(json.dumps([got, started, time.monotonic()]), flush=True)
            sys.stdin.readline()  # alive until both are done: a gone owner's rows are free
        """
        command = [sys.executable, "-c", textwrap.dedent(code), path]
        workers = [
            subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_env(),
                cwd=REPO,
            )
            for _ in range(2)
        ]
        try:
            for worker in workers:  # both are connected before either claims
                assert worker.stdout is not None
                assert worker.stdout.readline() == "ready\n"
            for worker in workers:  # then both are let go at once
                assert worker.stdin is not None
                worker.stdin.write("go\n")
                worker.stdin.flush()
            outputs = [worker.stdout.readline() for worker in workers if worker.stdout]
            for worker in workers:
                worker.communicate(timeout=RUN_TIMEOUT)
        finally:
            for worker in workers:
                worker.kill()
                worker.communicate()
        (first, first_start, first_end), (second, second_start, second_end) = map(
            json.loads, outputs
        )
        # They claimed side by side (one may have drained it all while the other waited on
        # the lock: SQLite's lock is not fair).
        assert first_start < second_end
        assert second_start < first_end
        first, second = set(first), set(second)
        assert not first & second
        assert first | second == {f"m{n}" for n in range(count)}


class TestDeadOwners:
    def test_a_gone_processes_rows_are_claimable_at_once(self, spool: Spool, path: str) -> None:
        """A process that claimed rows and exited without release: its rows are free at once,
        though its heartbeat is fresh, because its pid no longer exists."""
        now = time.time()
        spool.add([track(n, now) for n in range(50)], owned=False)
        done = run_python(
            """
            import os, sys
            from whisperr._spool import Spool
            spool = Spool.open(sys.argv[1], max_bytes=1 << 40)
            print(len(spool.claim(1000).items), flush=True)
            os._exit(0)  # no release, no close
            """,
            path,
        )
        assert done.stdout == "50\n", done.stderr
        taker = other(path, Clock(now + 1))  # well within claim_timeout
        assert len(taker.claim(1000).items) == 50
        taker.close()

    def test_a_stale_heartbeat_frees_a_live_processes_rows(self, path: str) -> None:
        """An owner whose heartbeat is older than claim_timeout is dead, even if its pid lives;
        a heartbeat keeps it alive."""
        owner_clock, taker_clock = Clock(NOW), Clock(NOW)
        owner = other(path, owner_clock)
        taker = other(path, taker_clock)
        owner.add([track(n) for n in range(3)], owned=True)
        owner_clock.now = NOW + 20
        owner.heartbeat()
        taker_clock.now = NOW + 20 + 29.9
        assert taker.claim(10).items == []
        taker_clock.now = NOW + 20 + 30.1
        assert len(taker.claim(10).items) == 3
        owner.close()
        taker.close()


class TestRemove:
    def test_remove_deletes_by_message_id(self, spool: Spool) -> None:
        """The named rows go, in chunks past SQLite's variable limit; the others stay."""
        spool.add([track(n) for n in range(1500)], owned=True)
        assert spool.remove([f"m{n}" for n in range(1200)] + ["unknown"]) == 1200
        assert spool.info().events == 300
        spool.release()
        left = spool.claim(1000).items
        assert sorted(item[4] for item in left) == sorted(f"m{n}" for n in range(1200, 1500))

    def test_an_empty_id_removes_no_identify(self, spool: Spool) -> None:
        """Identifies all have the id "": removing "" must not delete every one of them."""
        spool.add([identify("a"), identify("b")], owned=False)
        assert spool.remove([""]) == 0
        assert spool.info().events == 2


class TestBound:
    def test_the_oldest_rows_are_evicted_and_reported(self, path: str) -> None:
        """Past max_bytes the oldest rows go, oldest first, and come back as evicted."""
        items = [track(n, NOW + n, size=100) for n in range(10)]
        limit = sum(map(stored_size, items[:7]))
        spool = other(path, max_bytes=limit)
        assert spool.add(items[:7], owned=False) == Added(7, [])
        added = spool.add(items[7:], owned=False)
        assert added == Added(3, items[:3])
        info = spool.info()
        assert (info.events, info.bytes) == (7, sum(map(stored_size, items[3:])))
        assert info.bytes <= limit
        spool.close()

    def test_an_item_larger_than_the_bound_evicts_itself(self, path: str) -> None:
        """An offered item alone larger than max_bytes is stored and evicted at once."""
        small, huge = track(1, NOW), track(2, NOW + 1, size=10_000)
        spool = other(path, max_bytes=stored_size(small) + 100)
        spool.add([small], owned=False)
        assert spool.add([huge], owned=False) == Added(1, [small, huge])
        assert spool.info().events == 0
        spool.close()

    def test_rows_a_live_owner_holds_are_counted_apart(self, path: str) -> None:
        """Write-ahead copies deleted for the bound are still in memory: held, not evicted."""
        items = [track(n, NOW + n, size=100) for n in range(4)]
        spool = other(path, max_bytes=sum(map(stored_size, items[:3])))
        spool.add(items[:1], owned=True)
        spool.add(items[1:3], owned=False)
        assert spool.add(items[3:], owned=False) == Added(1, [], held=1)
        assert spool.add([track(9, NOW + 9, size=100)], owned=False) == Added(1, [items[1]])
        spool.close()


class TestExpiry:
    def test_claim_deletes_and_returns_expired_rows_apart(self, spool: Spool, clock: Clock) -> None:
        """Rows past the API's window (with a minute's margin) are expired, the rest claimed."""
        edge = NOW - ev.MAX_PAST + 60
        old, older, fresh = track(1, edge - 1), track(2, edge - 1000), track(3, edge + 1)
        spool.add([fresh, old, older], owned=False)
        claim = spool.claim(10)
        assert claim.items == [fresh]
        assert claim.expired == [older, old]
        assert spool.info().events == 1


class TestOpen:
    def test_the_file_is_private_whatever_the_umask(self, path: str) -> None:
        """The file and its WAL are 0600 even under umask 0."""
        previous = os.umask(0)
        try:
            spool = other(path)
            spool.add([track(1)], owned=False)
        finally:
            os.umask(previous)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path + "-wal").st_mode) == 0o600
        assert spool._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        spool.close()

    def test_garbage_is_moved_aside_for_a_fresh_spool(
        self, path: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A file that is not a database is renamed (logged at ERROR), and a fresh one works."""
        garbage = b"this is not a database" * 200
        Path(path).write_bytes(garbage)
        with caplog.at_level(logging.ERROR, logger="whisperr"):
            spool = Spool.open(path, max_bytes=BIG, clock=Clock(NOW))
        aside = f"{path}.corrupt-{int(NOW)}"
        assert Path(aside).read_bytes() == garbage
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert path in record.getMessage()
        assert aside in record.getMessage()
        assert spool is not None
        spool.add([track(1)], owned=False)
        assert len(spool.claim(10).items) == 1
        spool.close()

    def test_damaged_pages_are_found_at_open(
        self, path: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A spool whose pages past the first were overwritten fails its check: moved aside."""
        spool = other(path)
        spool.add([track(n, size=200) for n in range(300)], owned=False)
        spool.close()  # the last connection: the WAL is written back and removed
        with open(path, "r+b") as file:
            file.seek(4096)
            file.write(b"\xa5" * (os.path.getsize(path) - 4096))
        with caplog.at_level(logging.ERROR, logger="whisperr"):
            again = Spool.open(path, max_bytes=BIG, clock=Clock(NOW))
        assert os.path.exists(f"{path}.corrupt-{int(NOW)}")
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        assert again is not None
        assert again.info().events == 0
        again.close()

    def test_a_newer_schema_is_refused_and_left_alone(
        self, path: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A file from a newer whisperr: None, ERROR, and the file untouched."""
        other(path).close()
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
        before = Path(path).read_bytes()
        with caplog.at_level(logging.ERROR, logger="whisperr"):
            assert Spool.open(path, max_bytes=BIG) is None
        assert "newer" in caplog.text
        assert Path(path).read_bytes() == before
        assert not [name for name in os.listdir(os.path.dirname(path)) if "corrupt" in name]

    def test_another_applications_database_is_left_alone(self, path: str) -> None:
        """A SQLite file with tables of its own is not taken over."""
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE events (anything TEXT)")
        db.close()
        assert Spool.open(path, max_bytes=BIG) is None
        with sqlite3.connect(path) as db:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
        db.close()
        assert tables == ["events"]

    def test_an_impossible_place_gives_none(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A path below a regular file: None, logged at ERROR (the client runs memory-only)."""
        (tmp_path / "file").write_bytes(b"")
        with caplog.at_level(logging.ERROR, logger="whisperr"):
            assert Spool.open(str(tmp_path / "file" / "spool.db"), max_bytes=BIG) is None
        assert "cannot be used" in caplog.text

    @pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"
    )
    def test_an_unwritable_directory_gives_none(self, tmp_path: Path) -> None:
        """A directory without write permission: None."""
        tmp_path.chmod(0o500)
        try:
            assert Spool.open(str(tmp_path / "spool.db"), max_bytes=BIG) is None
        finally:
            tmp_path.chmod(0o700)


class TestClosed:
    def test_a_closed_spool_raises_spool_error(self, spool: Spool) -> None:
        """Calls after close() raise SpoolError, not sqlite3's exceptions."""
        spool.close()
        with pytest.raises(SpoolError):
            spool.add([track(1)], owned=False)
        with pytest.raises(SpoolError):
            spool.info()


class TestBusy:
    def test_a_locked_file_raises_spool_busy_quickly(self, spool: Spool, path: str) -> None:
        """Another connection holding BEGIN EXCLUSIVE: writes raise SpoolBusy within a second,
        reads still work (WAL), and once it commits writes work again."""
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            for call in (lambda: spool.add([track(1)], owned=False), lambda: spool.claim(1)):
                started = time.monotonic()
                with pytest.raises(SpoolBusy):
                    call()
                assert time.monotonic() - started < 1.0
            assert spool.info().events == 0
        finally:
            holder.execute("COMMIT")
            holder.close()
        assert spool.add([track(1)], owned=False).stored == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
class TestFork:
    @staticmethod
    def in_child(spool: Spool, *, call_after_fork: bool) -> object:
        """Fork; the child claims, adds a row of its own and reports; the parent waits."""
        parent_connection = spool._db
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's clean-up
            status = 1
            try:
                if call_after_fork:
                    spool.after_fork()
                claimed = spool.claim(10).items
                spool.add([track(2)], owned=True)
                new = spool._db is not parent_connection
                os.write(write, json.dumps([len(claimed), new]).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = json.loads(pipe.read() or b"null")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        return report

    def test_a_forked_child_is_a_new_owner_on_a_new_connection(self, spool: Spool) -> None:
        """In a child, after_fork: the parent's rows stay the parent's, the child's rows are its
        own, and the parent's connection still works once the child has gone."""
        spool.add([track(1)], owned=True)
        # nothing of the parent's, on a connection of its own
        assert self.in_child(spool, call_after_fork=True) == [0, True]
        # The child is gone: its row is free; the parent's own row is never handed back.
        assert [item[4] for item in spool.claim(10).items] == ["m2"]
        assert spool.info().events == 2

    def test_a_child_that_forgot_after_fork_does_not_use_the_parents_connection(
        self, spool: Spool
    ) -> None:
        """The first call in a child without after_fork makes it first."""
        spool.add([track(1)], owned=True)
        assert self.in_child(spool, call_after_fork=False) == [0, True]
        assert [item[4] for item in spool.claim(10).items] == ["m2"]

    def test_a_fork_waits_for_a_transaction_under_way(self, spool: Spool) -> None:
        """A fork while another thread is inside a transaction: SQLite keeps a process's locks
        in its memory, which the child inherits, so the fork waits for the transaction to end;
        else the child would find the file locked for ever by its parent's copy."""
        spool.add([track(1)], owned=True)
        inside, done = threading.Event(), threading.Event()

        def hold() -> None:
            with spool._write():
                inside.set()
                done.wait(10)  # until the fork is under way (its wait is what is tested)

        holder = threading.Thread(target=hold)
        holder.start()
        assert inside.wait(10)
        # The fork below blocks until the transaction ends: end it from another thread, once
        # the fork has begun (a delay here only orders the two; it decides nothing).
        threading.Timer(0.2, done.set).start()
        try:
            assert self.in_child(spool, call_after_fork=True) == [0, True]
        finally:
            done.set()
            holder.join(10)


class TestCommandLine:
    def run(self, *args: str, base_url: str = "") -> subprocess.CompletedProcess[str]:
        env = _env() | ({"WHISPERR_BASE_URL": base_url} if base_url else {})
        return subprocess.run(
            [sys.executable, "-m", "whisperr.spool", *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
            cwd=REPO,
            check=False,
        )

    def test_info_shows_the_counts(self, path: str) -> None:
        """PATH alone prints events, bytes, ages, claimed and owners; never the API key."""
        now = time.time()
        items = [track(1, now - 7200), track(2, now - 60)]
        spool = other(path, time.time)  # a live owner: the command line reads the real clock
        spool.add(items, owned=True)
        done = self.run(path)
        spool.close()
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
        assert lines["events"] == "2"
        assert lines["bytes"] == str(sum(map(stored_size, items)))
        assert lines["oldest"].endswith("(2h 0m ago)")
        assert lines["newest"].endswith(" ago)")
        assert " (1m " in lines["newest"]
        assert (lines["claimed"], lines["owners"]) == ("2", "1")
        assert API_KEY not in done.stdout + done.stderr

    def test_a_missing_file_is_not_created(self, tmp_path: Path) -> None:
        """A path that does not exist: said so, exit 1, and no file made."""
        missing = tmp_path / "missing.db"
        for args in ([], ["--export"], ["--purge"], ["--replay"]):
            done = self.run(str(missing), *args)
            assert done.returncode == 1
            assert "does not exist" in done.stderr
        assert not missing.exists()

    def test_export_writes_json_lines(self, spool: Spool, path: str, tmp_path: Path) -> None:
        """--export: one JSON object per row, oldest first, to stdout or --out (mode 0600)."""
        spool.add(
            [
                ("u", "signup", NOW, b'{"plan":"pro"}', "m1", b'{"ip":"10.0.0.1"}'),
                identify("u", NOW + 1),
            ],
            owned=False,
        )
        done = self.run(path, "--export")
        assert done.returncode == 0, done.stderr
        assert [json.loads(line) for line in done.stdout.splitlines()] == [
            {
                "external_user_id": "u",
                "event_type": "signup",
                "occurred_at": ev.format_timestamp(NOW),
                "message_id": "m1",
                "properties": {"plan": "pro"},
                "context": {"ip": "10.0.0.1"},
            },
            {
                "external_user_id": "u",
                "event_type": None,
                "occurred_at": ev.format_timestamp(NOW + 1),
                "message_id": "",
                "body": {"external_user_id": "u"},
                "context": None,
            },
        ]
        out = tmp_path / "export.jsonl"
        assert self.run(path, "--export", "--out", str(out)).returncode == 0
        assert out.read_text() == done.stdout
        assert stat.S_IMODE(out.stat().st_mode) == 0o600

    def test_purge_empties_the_spool(self, spool: Spool, path: str) -> None:
        """--purge deletes every row at once and says how many."""
        spool.add([track(n) for n in range(3)], owned=False)
        done = self.run(path, "--purge")
        assert (done.returncode, done.stdout) == (0, "purged 3 events\n")
        assert spool.info().events == 0

    @pytest.mark.skipif(
        not hasattr(whisperr.Stats, "replayed"), reason="the client has no spool replay yet"
    )
    def test_replay_delivers_the_spool(self, path: str) -> None:
        """--replay sends the spooled events to the API now, says how many, and empties it."""
        spool = other(path, time.time)
        now = time.time()
        spool.add([track(n, now - n) for n in range(3)], owned=False)
        spool.close()
        with local_server() as url:
            done = self.run(path, "--replay", "--timeout", "20", base_url=url)
            received = httpx.get(f"{url}/_local/events", timeout=10).json()["events"]
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["replayed: 3", "delivered: 3", "dropped: 0"]
        assert API_KEY not in done.stdout + done.stderr
        assert sorted(e["context"]["$message_id"] for e in received) == ["m0", "m1", "m2"]
        assert self.run(path).stdout.splitlines()[1] == "events: 0"


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """The bundled local API server on a free port of 127.0.0.1; its URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "whisperr.server", "--port", "0", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = server.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+", lines.get(timeout=RUN_TIMEOUT))
        assert match, "the server printed no URL"
        yield match.group()
    finally:
        server.terminate()
        server.communicate(timeout=RUN_TIMEOUT)
