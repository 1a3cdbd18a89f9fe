"""A forked child with spool_mode="always": its events reach the file while it lives.

Usage: spool_fork.py N

The parent makes a sync Client (settings from the WHISPERR_* environment), tracks one event and
forks while the spool's thread journals every few milliseconds. The child tracks N events and
waits (bounded) until the file holds them, reading it with sqlite3; it prints `CHILD {json}`
with the count it saw, then SIGKILLs itself (no exit path runs: only the journal can have
written them). The parent waits for it and closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import time

import whisperr

N = int(sys.argv[1])
PATH = os.environ["WHISPERR_SPOOL_PATH"]


def rows_of(user: str) -> int:
    with contextlib.closing(sqlite3.connect(PATH, timeout=5)) as db:
        (count,) = db.execute("SELECT count(*) FROM events WHERE user_id = ?", (user,)).fetchone()
    return int(count)


client = whisperr.Client()
for i in range(200):  # the parent keeps its spool's thread writing as the fork happens
    client.track("parent", "payment_failed", {"i": i})
pid = os.fork()
if pid == 0:
    for i in range(N):
        client.track("child", "payment_failed", {"i": i})
    deadline = time.monotonic() + 10
    seen = rows_of("child")
    while seen < N and time.monotonic() < deadline:
        time.sleep(0.01)  # the condition is the file, written by the child's spool thread
        seen = rows_of("child")
    print("CHILD " + json.dumps({"seen": seen}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
os.waitpid(pid, 0)
client.close()
