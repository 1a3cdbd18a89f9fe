"""What a lifecycle script reports back to tests/test_lifecycle.py.

Import it BEFORE whisperr: it registers its exit hook at import, and atexit runs hooks last in,
first out, so this hook runs after every hook whisperr registers (at import or when a client is
made), that is after the exit-time delivery. It then prints one line to stdout:

    LIFECYCLE {"pid": ..., "clients": {name: stats}, "reports": [...], "marks": {...}, ...}

Only the process that imported it prints: a forked child inherits the hook but stays silent.
Warnings and errors of the `whisperr` logger go to stderr, one line each, `LEVEL logger: text`.

With LIFECYCLE_DUMP_AFTER=<seconds> in the environment (the tests set it a little below their
own timeout), a process still running after that long prints every thread's stack to stderr
and exits with status 70: a hang shows where it hangs. `rearm()` starts that countdown again.
(A daemon thread does it, holding the GIL: faulthandler's dump of running threads can crash.)
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

MARKER = "LIFECYCLE "

_pid = os.getpid()
_lock = threading.Lock()
_clients: dict[str, Any] = {}
_reports: list[dict[str, Any]] = []
_marks: dict[str, float] = {}
_notes: dict[str, Any] = {}


def on_error(report: Any) -> None:
    """An `on_error` hook: keep the report (from any thread)."""
    with _lock:
        _reports.append(
            {
                "type": report.type,
                "reason": report.reason,
                "count": report.count,
                "message_ids": list(report.message_ids),
                "message": report.message,
            }
        )


def take_reports() -> list[dict[str, Any]]:
    """The reports kept so far, forgetting them."""
    with _lock:
        taken = list(_reports)
        _reports.clear()
    return taken


def watch(client: Any, name: str = "client") -> Any:
    """Print this client's stats at exit; returns the client."""
    _clients[name] = client
    return client


def mark(name: str) -> None:
    """Remember when (time.monotonic()) something happened."""
    _marks[name] = time.monotonic()


def note(**values: Any) -> None:
    """Add values to the line printed at exit."""
    _notes.update(values)


def stats(client: Any) -> dict[str, Any]:
    """The fields of client.stats() the tests read, or the error reading them raised."""
    try:
        s = client.stats()
    except Exception as exc:
        return {"error": repr(exc)}
    return {
        "tracked": s.tracked,
        "identified": s.identified,
        "replayed": s.replayed,
        "delivered": s.delivered,
        "dropped": s.dropped,
        "spooled": s.spooled,
        "dropped_by_reason": dict(s.dropped_by_reason),
        "queued": s.queued,
        "in_flight": s.in_flight,
    }


_deadline = 0.0
_watchdog: threading.Thread | None = None


def rearm() -> None:
    """Start the LIFECYCLE_DUMP_AFTER countdown (again), if it is set."""
    global _deadline, _watchdog
    seconds = float(os.environ.get("LIFECYCLE_DUMP_AFTER", "0"))
    if seconds <= 0:
        return
    _deadline = time.monotonic() + seconds
    if _watchdog is None:
        _watchdog = threading.Thread(target=_watch, name="lifecycle-watchdog", daemon=True)
        _watchdog.start()


def _watch() -> None:
    if hasattr(signal, "pthread_sigmask"):  # the script's signals are for its own threads
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    while (remaining := _deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, 0.5))
    names = {t.ident: t.name for t in threading.enumerate()}
    dump = [f"LIFECYCLE HANG: still running after LIFECYCLE_DUMP_AFTER; stacks of pid {_pid}:"]
    for ident, frame in sys._current_frames().items():
        dump.append(f"--- thread {names.get(ident, ident)}")
        dump.extend(line.rstrip() for line in traceback.format_stack(frame))
    dump.extend(_pending_tasks())
    print("\n".join(dump), file=sys.stderr, flush=True)
    os._exit(70)


def _pending_tasks() -> list[str]:
    """Where each task of each running asyncio loop is suspended (what it awaits)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return []
    lines = []
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if not loop.is_running():
            continue
        for _ in range(3):  # the loop's thread may change its set of tasks meanwhile
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                tasks = []
        for task in tasks:
            lines.append(f"--- task {task.get_name()} of {loop!r}")
            lines.extend(_awaiting(task.get_coro()))
    return lines


def _awaiting(coro: Any) -> list[str]:
    """The chain of awaits of a suspended coroutine, outermost first."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.extend(line.rstrip() for line in traceback.format_stack(frame, limit=1))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


def _emit() -> None:
    if os.getpid() != _pid:
        return
    mark("exit_hook")
    line = {
        "pid": _pid,
        "clients": {name: stats(client) for name, client in _clients.items()},
        "reports": take_reports(),
        "marks": _marks,
        "notes": _notes,
    }
    print(MARKER + json.dumps(line), flush=True)


atexit.register(_emit)
rearm()
logging.basicConfig(
    level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
)
