"""The durable spool (spool_path) as users meet it: real processes, the real bundled server.

Each case runs scripts of tests/lifecycle/ (spool_*.py) in processes of their own against
`python -m whisperr.server` (the `server` fixture of tests/test_lifecycle.py), or against a port
where nothing listens (`down_url`). What counts is what the SERVER stored (`GET /_local/events`,
one copy per `$message_id`) and what the spool FILE holds (read here with sqlite3, table
`events`), not only the SDK's counters; the counters are checked too, with the identity of
Stats: after aclose(), `tracked + identified + replayed == delivered + dropped + spooled`.

The server's echo (one head line per request, with its event count) tells what arrived on the
wire: where an event may be sent twice (a SIGKILL between a delivery and the deletion of its row
from the file), the wire may carry more than the server stored; elsewhere both must agree.
Every wait is on a condition (a line printed, a count reached) with a deadline; every process
started is killed in a `finally`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import test_lifecycle as _lifecycle
from .test_lifecycle import (
    _ECHO_HEAD,
    SCRIPT_TIMEOUT,
    START_TIMEOUT,
    Lines,
    Run,
    ServerProcess,
    assert_stored_once,
    end_session,
    sample,
    script_env,
    start_script,
    stop,
)
from .test_lifecycle import run_script as _run_script

# The fixtures `server` and `down_url` of tests/test_lifecycle.py: pytest finds a fixture in a
# test module's namespace, by the name it has there.
server = _lifecycle.server
down_url = _lifecycle.down_url

CLOSE_BUDGET = 1.0  # WHISPERR_SHUTDOWN_TIMEOUT of every script here: a dead server costs 1 s
REPLAY_TIMEOUT = 30.0  # for the server to have stored what a replay sends
WINDOW = 0.05  # spool_sync_interval of the SIGKILL case
# An event tracked at least this long before the SIGKILL must have reached the file: the window
# (50 ms) plus a margin for a loaded machine (the spool's thread waits for the GIL and the disk).
SAFE_BEFORE_KILL = 1.0
RUN_BEFORE_KILL = 2.0  # the burst runs this long before the kill: SAFE_BEFORE_KILL is covered
BURST = 200  # events per burst of spool_burst.py

_RECORD_HEAD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


# -- helpers ------------------------------------------------------------------------------------


def spool_env(base_url: str, spool: Path, **extra: str) -> dict[str, str]:
    """A script's environment with WHISPERR_SPOOL_PATH (settings from the environment, as the
    spool's settings promise), a 1 s shutdown budget, and `extra` (which may override)."""
    env = script_env(base_url, WHISPERR_SPOOL_PATH=str(spool))
    env.update(WHISPERR_SHUTDOWN_TIMEOUT=str(CLOSE_BUDGET), **extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str]) -> Run:
    """tests/test_lifecycle.py's run_script; a failing exit fails the test with the output."""
    run = _run_script(name, *args, env=env)
    assert run.returncode == 0, f"{name} {' '.join(args)}: {run}"
    return run


@contextlib.contextmanager
def spool_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of this test to the spool file (which must exist), closed afterwards."""
    assert path.exists(), f"no spool file at {path}"
    db = sqlite3.connect(path, timeout=10)
    try:
        yield db
    finally:
        db.close()


def spooled_ids(path: Path) -> list[str]:
    """The message id of every row of the file's `events` table (duplicates kept)."""
    with spool_db(path) as db:
        return [row[0] for row in db.execute("SELECT message_id FROM events")]


def spooled_count(path: Path) -> int:
    with spool_db(path) as db:
        (count,) = db.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


def tracked_ids(ids_file: Path) -> dict[str, float]:
    """What spool_fill.py wrote: each id track() returned, with time.time() just before."""
    lines = [json.loads(line) for line in ids_file.read_text().splitlines()]
    found = {line["id"]: line["t"] for line in lines}
    assert len(found) == len(lines), "track() returned the same message id twice"
    return found


def closed_stats(run: Run) -> dict[str, Any]:
    """The client's stats right after aclose(), as spool_*.py noted them."""
    stats: dict[str, Any] = run.probe["notes"]["closed"]
    assert "error" not in stats, str(run)
    return stats


def exit_stats(run: Run) -> dict[str, Any]:
    """The client's stats at exit, after whisperr's own exit hook (see spool_common.py)."""
    stats: dict[str, Any] = run.probe["notes"]["stats"]["client"]
    assert "error" not in stats, str(run)
    return stats


def assert_identity(stats: dict[str, Any], context: object) -> None:
    left = stats["tracked"] + stats["identified"] + stats["replayed"]
    right = stats["delivered"] + stats["dropped"] + stats["spooled"]
    assert left == right, (
        f"tracked + identified + replayed = {left} != {right} = delivered + dropped + spooled:"
        f" {stats}\n{context}"
    )
    assert stats["queued"] == stats["in_flight"] == 0, f"{stats}\n{context}"


def stored_events(server: ServerProcess) -> dict[str, Any]:
    """The server's whole store: {"events": [...], "identifies": [...]}."""
    with httpx.Client(trust_env=False, timeout=30) as http:
        response = http.get(f"{server.url}/_local/events")
    assert response.status_code == 200, response
    found: dict[str, Any] = response.json()
    return found


def wait_stored(server: ServerProcess, count: int, timeout: float, context: Callable[[], str]):
    """Wait until the server stored `count` events (each check after a new echo line)."""
    deadline = time.monotonic() + timeout
    while True:
        start = len(server.lines.lines)
        stored = len(server.ids())
        if stored >= count:
            return
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the server stored {stored} of {count} in {timeout}s\n{context()}"
        server.lines.wait_for(lambda line: bool(_ECHO_HEAD.match(line)), remaining, start)


def replay_until_done(server: ServerProcess, spool: Path, expected: set[str]) -> Run:
    """A new process, the server up, same spool: its client replays everything; the server
    stored exactly `expected`, each once on the wire; the spool ends empty."""
    count = spooled_count(spool)
    run = run_script("spool_replay.py", "count", str(count), env=spool_env(server.url, spool))
    stats = closed_stats(run)
    assert stats["replayed"] == count, f"replayed {stats['replayed']} of {count} rows\n{run}"
    assert (stats["delivered"], stats["dropped"], stats["spooled"]) == (count, 0, 0), str(run)
    assert_identity(stats, run)
    assert_stored_once(server, expected, run)
    assert spooled_count(spool) == 0, f"the spool still holds rows after the replay\n{run}"
    return run


def log_records(run: Run, level: str) -> list[str]:
    """The records of the `whisperr` logger at `level` on a script's stderr, each with its
    continuation lines (probe.py's format: `LEVEL logger: message`)."""
    records: list[list[str]] = []
    for line in run.stderr.splitlines():
        if _RECORD_HEAD.match(line):
            records.append([line])
        elif records:
            records[-1].append(line)
    return ["\n".join(r) for r in records if r[0].startswith(f"{level} whisperr: ")]


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- 1. what is left at the aclose() deadline, replayed by the next process ---------------------

N_CLOSE = 10_000


@pytest.mark.parametrize("replayer", ["client", "cli"])
def test_left_at_close_is_spooled_then_replayed_once(
    server: ServerProcess, down_url: str, tmp_path: Path, replayer: str
) -> None:
    """Server down: 10,000 track(), aclose(timeout=1): all 10,000 in the file. A new process,
    server up, replays them: stored once each, with their original $message_id and
    occurred_at; the file ends empty.

    `replayer`: the replaying process is an app that only makes a client and flushes, or
    `python -m whisperr.spool PATH --replay`.
    """
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    fill = run_script(
        "spool_fill.py", str(N_CLOSE), str(ids_file), "aclose", env=spool_env(down_url, spool)
    )
    ids = tracked_ids(ids_file)
    assert len(ids) == N_CLOSE
    stats = closed_stats(fill)
    assert (stats["tracked"], stats["spooled"]) == (N_CLOSE, N_CLOSE), str(fill)
    assert (stats["delivered"], stats["dropped"]) == (0, 0), str(fill)
    assert_identity(stats, fill)
    rows = spooled_ids(spool)
    assert Counter(rows) == Counter(list(ids)), (
        f"the file holds {len(rows)} rows ({len(set(rows))} ids) for {N_CLOSE} spooled"
    )

    replay_started = time.time()
    if replayer == "client":
        run = replay_until_done(server, spool, set(ids))
        assert run.stats["delivered"] == N_CLOSE, str(run)
    else:
        env = spool_env(server.url, spool)
        del env["WHISPERR_SPOOL_PATH"]  # the command line takes the path as its argument
        command = [
            sys.executable,
            "-m",
            "whisperr.spool",
            str(spool),
            "--replay",
            "--timeout",
            "20",
        ]
        cli = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT
        )
        output = f"exit {cli.returncode}\n{cli.stdout}\n{cli.stderr}"
        assert cli.returncode == 0, output
        print(f"\n[cli replay] {' '.join(cli.stdout.split())}")
        assert_stored_once(server, set(ids), output)
        assert spooled_count(spool) == 0, f"the spool still holds rows\n{output}"

    late = []
    for event in stored_events(server)["events"]:
        message_id = event["context"]["$message_id"]
        occurred = stamp(event["occurred_at"])
        # the stamp is the first process's (to the millisecond), never the replay's
        if not (ids[message_id] - 0.002 <= occurred < replay_started):
            late.append((message_id, event["occurred_at"], ids[message_id]))
    assert not late, f"{len(late)} events lost their occurred_at, e.g. {late[:3]}"


@pytest.mark.parametrize("mode", ["on_failure", "always"])
def test_identify_is_never_spooled(
    server: ServerProcess, down_url: str, tmp_path: Path, mode: str
) -> None:
    """Server down: identify() then 100 track(), aclose(timeout=1): the 100 tracks are spooled,
    the identify is not (it is dropped and counted so); the next process replays no identify."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    env = spool_env(down_url, spool, WHISPERR_SPOOL_MODE=mode)
    fill = run_script("spool_fill.py", "100", str(ids_file), "aclose", "identify", env=env)
    ids = tracked_ids(ids_file)
    stats = closed_stats(fill)
    assert_identity(stats, fill)
    with spool_db(spool) as db:
        (identifies,) = db.execute(
            "SELECT count(*) FROM events WHERE event_type IS NULL"
        ).fetchone()
    assert identifies == 0, f"an identify() was written to the spool\n{fill}"
    assert Counter(spooled_ids(spool)) == Counter(list(ids)), str(fill)
    assert (stats["identified"], stats["spooled"], stats["dropped"]) == (1, 100, 1), (
        f"the identify was not counted dropped: {stats}\n{fill}"
    )
    replay_until_done(server, spool, set(ids))
    assert stored_events(server)["identifies"] == [], "an identify() was replayed"


def test_kept_after_an_auth_failure_is_spooled_then_replayed(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A wrong API key: the server answers 401, the client keeps its batches; at aclose() they
    go to the file, not dropped. The next process, with the right key, delivers each once."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    env = spool_env(server.url, spool, WHISPERR_API_KEY="wrk_wrong_key")
    fill = run_script("spool_fill.py", "1000", str(ids_file), "aclose", env=env)
    ids = tracked_ids(ids_file)
    stats = closed_stats(fill)
    assert (stats["tracked"], stats["delivered"], stats["dropped"]) == (1000, 0, 0), str(fill)
    assert stats["spooled"] == 1000, str(fill)
    assert_identity(stats, fill)
    refused = server.wire().refused
    assert refused, "the server refused no request: was the key wrong?"
    assert all(line.startswith("401 ") for line in refused), refused
    assert server.ids() == []
    assert Counter(spooled_ids(spool)) == Counter(list(ids))
    server.reset()  # the 401s are not what the replay is judged by
    replay_until_done(server, spool, set(ids))


def test_cli_replay_says_so_when_not_all_delivered(down_url: str, tmp_path: Path) -> None:
    """`python -m whisperr.spool PATH --replay` with the server down: not all delivered, so it
    exits 1 (its documented status), and the file keeps every event."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    run_script("spool_fill.py", "1000", str(ids_file), "aclose", env=spool_env(down_url, spool))
    env = spool_env(down_url, spool)
    del env["WHISPERR_SPOOL_PATH"]
    command = [sys.executable, "-m", "whisperr.spool", str(spool), "--replay", "--timeout", "1"]
    cli = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
    output = f"exit {cli.returncode}\n{cli.stdout}\n{cli.stderr}"
    assert spooled_count(spool) == 1000, output  # nothing lost meanwhile
    assert cli.returncode == 1, output
    assert "delivered: 0" in cli.stdout.splitlines(), output


# -- 2. SIGKILL with spool_mode="always" --------------------------------------------------------


@pytest.mark.parametrize("state", ["down", "up"])
def test_sigkill_loses_at_most_the_sync_window(
    server: ServerProcess, down_url: str, tmp_path: Path, state: str
) -> None:
    """spool_mode="always", spool_sync_interval=0.05: a process tracking bursts is SIGKILLed
    after 2 s. Every event tracked more than SAFE_BEFORE_KILL (1 s) before the kill is on the
    server after a new process replays the file, stored once; none that was not tracked; the
    file ends empty. The killed process's rows are taken over at once (its pid is gone).

    `down`: nothing was delivered, so the file alone must hold every event (the journal's
    promise in full); `up`: most were delivered, and the file holds the rest, plus those
    delivered whose deletion was not committed yet (sent again: the server deduplicates).
    """
    spool = tmp_path / "spool.db"
    url = server.url if state == "up" else down_url
    env = spool_env(
        url, spool, WHISPERR_SPOOL_MODE="always", WHISPERR_SPOOL_SYNC_INTERVAL=str(WINDOW)
    )
    process = start_script("spool_burst.py", str(BURST), env=env)
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = Lines(process.stdout), Lines(process.stderr)

    def progress(line: str) -> dict[str, Any] | None:
        if not line.startswith("PROGRESS "):
            return None
        with contextlib.suppress(ValueError):  # a line cut short by the kill
            found: dict[str, Any] = json.loads(line.removeprefix("PROGRESS "))
            return found
        return None

    try:
        first = out.wait_for(lambda line: progress(line) is not None, START_TIMEOUT)
        assert first is not None, f"no progress:\n{out.text()}\n{err.text()}"
        t0 = progress(out.lines[first])["t"]  # type: ignore[index]
        late = out.wait_for(
            lambda line: (p := progress(line)) is not None and p["t"] >= t0 + RUN_BEFORE_KILL,
            RUN_BEFORE_KILL + 10,
            first,
        )
        assert late is not None, f"the burst stalled:\n{out.text()}\n{err.text()}"
        killed_at = time.monotonic()  # the same clock as the child's (CLOCK_MONOTONIC)
        process.kill()
        process.wait(10)
    finally:
        stop(process)
        end_session(process)
        out.close()
        err.close()
    context = f"--- killed child's stderr\n{err.text()}"
    marks = [p for line in out.lines if (p := progress(line)) is not None]
    safe = max((p["next"] for p in marks if p["t"] <= killed_at - SAFE_BEFORE_KILL), default=0)
    bound = marks[-1]["next"] + BURST  # it may have tracked one more burst, not printed
    assert safe >= 2 * BURST, f"too little tracked before the kill: {marks[:3]}"
    must = {f"burst-{i}" for i in range(safe)}
    could = {f"burst-{i}" for i in range(bound)}

    rows = spooled_ids(spool)
    duplicated = [mid for mid, n in Counter(rows).items() if n > 1]
    assert not (set(rows) - could), f"rows never tracked: {sample(set(rows) - could)}"
    if state == "down":  # nothing delivered: the file alone holds them
        missing = must - set(rows)
        assert not missing, (
            f"{len(missing)} of {len(must)} events tracked >= {SAFE_BEFORE_KILL}s before the"
            f" kill are not in the file: {sample(missing)}\n{context}"
        )

    before_replay = server.wire().accepted  # delivered by the killed process
    started = time.monotonic()
    count = len(rows)
    replay = run_script("spool_replay.py", "count", str(count), env=spool_env(server.url, spool))
    replay_seconds = time.monotonic() - started
    stats = closed_stats(replay)
    assert stats["replayed"] == count, f"replayed {stats['replayed']} of {count} rows\n{replay}"
    assert stats["dropped"] == 0, str(replay)
    assert_identity(stats, replay)
    # a dead process's rows are taken over at once, not after the 30 s heartbeat timeout
    assert replay_seconds < 15, f"the replay took {replay_seconds:.1f}s\n{replay}"

    wire = server.wire()
    ids = server.ids()
    stored = set(ids)
    assert len(ids) == len(stored)
    missing = must - stored
    assert not missing, (
        f"{len(missing)} of {len(must)} events tracked >= {SAFE_BEFORE_KILL}s before the kill"
        f" were never stored: {sample(missing)}\n{replay}\n{context}"
    )
    assert not (stored - could), f"stored but never tracked: {sample(stored - could)}"
    assert not wire.refused, f"refused: {wire.refused}"
    assert wire.accepted >= len(stored)
    assert spooled_count(spool) == 0, f"the spool still holds rows after the replay\n{replay}"
    # What the kill cost: the first event never stored was tracked after the last mark before it.
    first_lost = next((i for i in range(bound) if f"burst-{i}" not in stored), bound)
    lost_at = max((p["t"] for p in marks if p["next"] <= first_lost), default=t0)
    print(
        f"\n[sigkill/{state}] tracked {bound - BURST}..{bound}, safe {safe}, file {count} rows"
        f" ({len(duplicated)} ids twice), stored {len(stored)}, on the wire {wire.accepted}"
        f" ({before_replay} before the replay): re-sent {wire.accepted - len(stored)}; lost from"
        f" #{first_lost} on, tracked at most {1000 * (killed_at - lost_at):.0f} ms before the kill"
    )


# -- 3. two processes replaying one spool at once -----------------------------------------------

N_SHARED = 20_000


def test_two_processes_replay_one_spool_without_duplicates(
    server: ServerProcess, down_url: str, tmp_path: Path
) -> None:
    """A file of 20,000 spooled events; two new processes start on it at the same moment: the
    server stores each event once and receives each once (rows are claimed atomically); their
    replayed counts sum to 20,000; the file ends empty."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    run_script(
        "spool_fill.py", str(N_SHARED), str(ids_file), "aclose", env=spool_env(down_url, spool)
    )
    ids = set(tracked_ids(ids_file))
    assert spooled_count(spool) == N_SHARED

    env = spool_env(server.url, spool)
    processes = [
        start_script("spool_replay.py", "stdin", env=env, stdin=subprocess.PIPE) for _ in range(2)
    ]
    outs, errs = [], []
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stderr is not None
            outs.append(Lines(process.stdout))
            errs.append(Lines(process.stderr))

        def context() -> str:
            return "\n".join(
                f"--- replayer {n}\n{o.text()}\n{e.text()}"
                for n, (o, e) in enumerate(zip(outs, errs, strict=True))
            )

        for out in outs:
            assert out.wait_for(lambda line: line.startswith("READY"), START_TIMEOUT) is not None, (
                context()
            )
        for process in processes:  # both make their client now
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for out in outs:
            assert (
                out.wait_for(lambda line: line.startswith("STARTED"), START_TIMEOUT) is not None
            ), context()
        wait_stored(server, N_SHARED, REPLAY_TIMEOUT, context)
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("close\n")
            process.stdin.close()
        for process in processes:
            assert process.wait(SCRIPT_TIMEOUT) == 0, context()
    finally:
        for process in processes:
            stop(process)
            end_session(process)
            with contextlib.suppress(OSError):
                if process.stdin is not None:
                    process.stdin.close()
        for lines in outs + errs:
            lines.close()

    runs = [
        Run(p.returncode, o.text(), e.text(), 0.0)
        for p, o, e in zip(processes, outs, errs, strict=True)
    ]
    stats = [closed_stats(run) for run in runs]
    for run, s in zip(runs, stats, strict=True):
        assert (s["dropped"], s["spooled"]) == (0, 0), str(run)
        assert_identity(s, run)
    replayed = [s["replayed"] for s in stats]
    assert_stored_once(server, ids, f"replayed {replayed}")
    assert sum(replayed) == N_SHARED, f"replayed {replayed}: {sum(replayed)} for {N_SHARED}"
    assert sum(s["delivered"] for s in stats) == N_SHARED, str(stats)
    assert spooled_count(spool) == 0, "the spool still holds rows"
    print(f"\n[two replayers] replayed {replayed}")


# -- 4. a corrupt file --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "damaged_pages"])
def test_corrupt_file_is_moved_aside_and_new_events_delivered(
    server: ServerProcess, down_url: str, tmp_path: Path, damage: str
) -> None:
    """A spool file that is not a readable database: the client starts, logs an ERROR naming
    `<path>.corrupt-<time>`, where the bytes now are; its new events are delivered, and a fresh
    spool takes the path.

    `garbage`: no SQLite file at all; `damaged_pages`: a real spool (1,000 rows) with its pages
    after the first overwritten."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    if damage == "garbage":
        bad = b"this is not a spool\x00\xff" * 4096
    else:
        run_script(
            "spool_fill.py",
            "1000",
            str(tmp_path / "old.jsonl"),
            "aclose",
            env=spool_env(down_url, spool),
        )
        assert spooled_count(spool) == 1000
        assert not Path(f"{spool}-wal").exists() or Path(f"{spool}-wal").stat().st_size == 0
        data = bytearray(spool.read_bytes())
        page = int.from_bytes(data[16:18], "big") or 65536
        assert len(data) > 3 * page
        data[page:] = b"\xa5" * (len(data) - page)
        bad = bytes(data)
    spool.write_bytes(bad)

    run = run_script(
        "spool_fill.py", "100", str(ids_file), "aclose", env=spool_env(server.url, spool)
    )
    ids = set(tracked_ids(ids_file))
    errors = log_records(run, "ERROR")
    named = [
        m
        for record in errors
        if (m := re.search(re.escape(str(spool)) + r"\.corrupt-\d+(\.\d+)?", record))
    ]
    assert named, f"no ERROR naming {spool}.corrupt-*\n{run}"
    aside = Path(named[0][0])
    assert aside.exists(), f"{aside} named in the log does not exist\n{run}"
    assert aside.read_bytes() == bad, f"{aside} does not hold the corrupt bytes"
    assert sorted(tmp_path.glob("spool.db.corrupt-*")) == [aside], list(tmp_path.iterdir())
    stats = closed_stats(run)
    assert (stats["tracked"], stats["delivered"], stats["dropped"], stats["spooled"]) == (
        100,
        100,
        0,
        0,
    ), str(run)
    assert_stored_once(server, ids, run)
    assert spooled_count(spool) == 0  # a fresh spool took the path


# -- 5. the bound: spool_max_bytes --------------------------------------------------------------

MAX_BYTES = 200_000
# The bound is on the rows (their `size` column), kept within it after every write; the file
# itself also holds SQLite's pages, indexes, and pages freed by evictions (SQLite does not
# shrink a file without VACUUM). A spill at close writes all its rows, then evicts the oldest:
# the file grows to hold one whole spill, then keeps that size (freed pages are reused).
FILE_SLACK = 2.0  # on disk <= FILE_SLACK x (MAX_BYTES + the bytes of the largest spill)
REGROWTH = 1.25  # a second spill of the same size reuses the freed pages: the file grows little


def bounded_contents(spool: Path) -> tuple[int, int, set[str], int]:
    """The rows' total size, their count, their ids, and the bytes on disk (with -wal, -shm)."""
    with spool_db(spool) as db:
        total, rows = db.execute("SELECT coalesce(sum(size), 0), count(*) FROM events").fetchone()
        kept = {row[0] for row in db.execute("SELECT message_id FROM events")}
    files = [spool, Path(f"{spool}-wal"), Path(f"{spool}-shm")]
    return int(total), int(rows), kept, sum(f.stat().st_size for f in files if f.exists())


def spool_full_ids(run: Run) -> list[str]:
    """The ids the on_error hook was told were dropped for 'spool_full' (counts checked)."""
    full = [r for r in run.probe["reports"] if r["reason"] == "spool_full"]
    assert all(r["type"] == "dropped" for r in full), str(full)
    reported = [mid for r in full for mid in r["message_ids"]]
    assert sum(r["count"] for r in full) == len(reported), str(full)
    return reported


def fill_bounded(
    spool: Path, ids_file: Path, down_url: str, mode: str = "on_failure"
) -> tuple[Run, dict[str, float]]:
    """A process spools 10,000 events (about 1.9 MB) under spool_max_bytes=200,000 (server
    down): the rows kept sum to at most the bound; the file within FILE_SLACK."""
    env = spool_env(
        down_url, spool, WHISPERR_SPOOL_MAX_BYTES=str(MAX_BYTES), WHISPERR_SPOOL_MODE=mode
    )
    run = run_script("spool_fill.py", str(N_CLOSE), str(ids_file), "aclose", env=env)
    assert_identity(closed_stats(run), run)
    total, rows, _, on_disk = bounded_contents(spool)
    spill = N_CLOSE * total / max(rows, 1)  # this spill's bytes, about
    print(
        f"\n[bound] {rows} rows kept, {total} bytes of rows, {on_disk} bytes on disk"
        f" ({on_disk / MAX_BYTES:.1f} x the bound; the spill was about {spill:.0f} bytes)"
    )
    assert 0 < total <= MAX_BYTES, f"the rows sum to {total} bytes for a bound of {MAX_BYTES}"
    assert on_disk <= FILE_SLACK * (MAX_BYTES + spill), f"{on_disk} bytes on disk\n{run}"
    return run, tracked_ids(ids_file)


def assert_evictions_reported(reported: list[str], kept: set[str], ids: dict[str, float]) -> None:
    """Each event tracked is either in the file or was reported 'spool_full', once; the oldest
    went."""
    assert not set(reported) & kept, "an event both reported dropped and kept in the file"
    lost = set(ids) - set(reported) - kept
    assert not lost, (
        f"{len(lost)} events neither in the file nor reported 'spool_full': {sample(lost)}"
        f" ({len(reported)} reported + {len(kept)} kept for {len(ids)} tracked)"
    )
    assert Counter(reported) + Counter(kept) == Counter(list(ids)), "an event reported twice"
    # occurred_at has millisecond resolution (events of one millisecond share it), and rows
    # of one millisecond go in the order they were written: compare to the millisecond.
    oldest_kept = min(ids[mid] for mid in kept)
    newer = [mid for mid in reported if ids[mid] > oldest_kept + 0.001]
    assert not newer, f"{len(newer)} newer events dropped: {sample(set(newer))}"


def test_spool_max_bytes_bounds_the_file_and_reports_spool_full(
    down_url: str, tmp_path: Path
) -> None:
    """spool_max_bytes=200,000, server down, 10,000 events spooled at close: the rows kept sum
    to at most the bound; the oldest were dropped, each reported 'spool_full' (every event is in
    the file or named in a report); the stats identity holds. A second process spooling as much
    again keeps within the bound, and the file does not grow (freed pages are reused)."""
    spool = tmp_path / "spool.db"
    run, ids = fill_bounded(spool, tmp_path / "ids0.jsonl", down_url)
    reported = spool_full_ids(run)
    assert reported, f"no 'spool_full' report\n{run}"
    _, _, kept, first_size = bounded_contents(spool)
    assert_evictions_reported(reported, kept, ids)

    fill_bounded(spool, tmp_path / "ids1.jsonl", down_url)
    second_size = bounded_contents(spool)[3]
    assert second_size <= REGROWTH * first_size, f"the file grew: {first_size} -> {second_size}"


@pytest.mark.parametrize("how", ["always", "earlier_process"])
def test_spool_full_reports_every_event_it_evicts(down_url: str, tmp_path: Path, how: str) -> None:
    """Server down, spool_max_bytes=200,000: every event tracked is in the file or was reported
    'spool_full', also where the evicted rows are the client's own.

    `always`: one process, spool_mode="always", 10,000 events journaled as tracked, the oldest
    evicted while it runs; `earlier_process`: two processes in turn, each spooling 10,000 at
    close, the second one evicting what the first one left (which it had claimed to replay)."""
    spool = tmp_path / "spool.db"
    ids: dict[str, float] = {}
    reported: list[str] = []
    for n in range(1 if how == "always" else 2):
        mode = "always" if how == "always" else "on_failure"
        run, tracked = fill_bounded(spool, tmp_path / f"ids{n}.jsonl", down_url, mode)
        ids |= tracked
        reported += spool_full_ids(run)
    _, _, kept, _ = bounded_contents(spool)
    assert_evictions_reported(reported, kept, ids)


# -- 6. queue overflow goes to the spool --------------------------------------------------------


def test_queue_overflow_is_spooled_then_replayed(
    server: ServerProcess, down_url: str, tmp_path: Path
) -> None:
    """max_queue_size=100, server down, 1,000 tracked at once: none dropped as queue_overflow;
    all 1,000 in the file; a later process delivers each once."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    env = spool_env(down_url, spool, WHISPERR_MAX_QUEUE_SIZE="100")
    run = run_script("spool_fill.py", "1000", str(ids_file), "aclose", env=env)
    ids = tracked_ids(ids_file)
    stats = closed_stats(run)
    assert "queue_overflow" not in stats["dropped_by_reason"], str(run)
    # Overflow goes to the file at once, and this client takes it back to send once the queue
    # has room: counted replayed, then spooled again at close (the identity allows for it).
    assert (stats["tracked"], stats["dropped"]) == (1000, 0), str(run)
    assert stats["spooled"] >= 1000, str(run)
    assert_identity(stats, run)
    assert Counter(spooled_ids(spool)) == Counter(list(ids))
    replay_until_done(server, spool, set(ids))


# -- 7. a loop that ends without aclose() -------------------------------------------------------


def test_loop_end_without_aclose_spools_at_exit(
    server: ServerProcess, down_url: str, tmp_path: Path
) -> None:
    """asyncio.run(main()) where main only tracks 1,000 events, server down: at exit they go to
    the file (the exit path), and a later process delivers each once."""
    spool, ids_file = tmp_path / "spool.db", tmp_path / "ids.jsonl"
    run = run_script(
        "spool_fill.py", "1000", str(ids_file), "loop_end", env=spool_env(down_url, spool)
    )
    ids = tracked_ids(ids_file)
    stats = exit_stats(run)
    assert (stats["tracked"], stats["dropped"], stats["spooled"]) == (1000, 0, 1000), str(run)
    assert_identity(stats, run)
    assert Counter(spooled_ids(spool)) == Counter(list(ids)), str(run)
    replay_until_done(server, spool, set(ids))


# -- a forked child --------------------------------------------------------------------------


@_lifecycle.needs_fork
def test_a_forked_child_journals_its_own_events(down_url: str, tmp_path: Path) -> None:
    """spool_mode="always" in a child forked while its parent's spool thread writes: the
    child's events reach the file while it lives (its SIGKILL leaves nothing else to write
    them), and the parent's are there too once it closed."""
    spool = tmp_path / "spool.db"
    env = spool_env(
        down_url, spool, WHISPERR_SPOOL_MODE="always", WHISPERR_SPOOL_SYNC_INTERVAL="0.005"
    )
    for _ in range(3):  # the fork lands at a different moment of the parent's writes each time
        with contextlib.suppress(FileNotFoundError):
            spool.unlink()
        run = run_script("spool_fork.py", "50", env=env)
        [line] = [x for x in run.stdout.splitlines() if x.startswith("CHILD ")]
        assert json.loads(line.removeprefix("CHILD ")) == {"seen": 50}, str(run)
        with spool_db(spool) as db:
            counts = dict(db.execute("SELECT user_id, count(*) FROM events GROUP BY user_id"))
        assert counts == {"child": 50, "parent": 200}, str(run)
