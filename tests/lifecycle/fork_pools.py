"""Cases 4 and 5: events tracked in forked children (multiprocessing, billiard).

Usage: fork_pools.py POOL KIND WHERE
    POOL   multiprocessing: one fork Process tracking "fork-process-0", then
                            Pool(2, maxtasksperchild=1) running 4 tasks ("fork-pool-0".."-3")
           billiard:        billiard's fork Pool(2, maxtasksperchild=1) running the 4 tasks
    KIND   sync (whisperr.Client) or async (whisperr.AsyncClient), one module-level client
    WHERE  parent: the parent makes the client before forking and tracks "fork-parent-0"
                   (as apps do: the client is made at import); the children inherit it
           child:  the parent never makes one; each child makes its own on first use

No process closes its client: each relies on exit-time delivery. Prints the children's exit
codes and pids with the LIFECYCLE line.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from typing import Any

import probe  # before whisperr: see probe's docstring

import whisperr

POOL, KIND, WHERE = sys.argv[1:4]
TASKS = [f"fork-pool-{i}" for i in range(4)]

client: Any = None


def get_client() -> Any:
    global client
    if client is None:
        make = whisperr.Client if KIND == "sync" else whisperr.AsyncClient
        client = make(on_error=probe.on_error)
    return client


def track_one(message_id: str) -> int:
    get_client().track("forked", "payment_failed", {"pid": os.getpid()}, message_id=message_id)
    return os.getpid()


def run_multiprocessing() -> None:
    context = multiprocessing.get_context("fork")
    process = context.Process(target=track_one, args=("fork-process-0",))
    process.start()
    process.join(30)
    pool = context.Pool(2, maxtasksperchild=1)
    pids = pool.map(track_one, TASKS, chunksize=1)
    pool.close()
    pool.join()
    probe.note(process_exitcode=process.exitcode, pool_pids=pids)


def run_billiard() -> None:
    import billiard

    pool = billiard.get_context("fork").Pool(2, maxtasksperchild=1)
    pids = pool.map(track_one, TASKS, chunksize=1)
    pool.close()
    pool.join()
    probe.note(pool_pids=pids)


if __name__ == "__main__":
    # Python 3.12+ warns when a process with threads forks (the sync client has one): noise here.
    warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
    if WHERE == "parent":
        probe.watch(get_client())
        track_one("fork-parent-0")
    if POOL == "billiard":
        run_billiard()
    else:
        run_multiprocessing()
    probe.mark("work_done")
