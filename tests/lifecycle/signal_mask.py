"""Case 5b: the delivery thread takes no signal meant for the app's threads.

Usage: signal_mask.py KIND    (sync: whisperr.Client, async: whisperr.AsyncClient, no loop)

Tracks one event, so that the client's own delivery thread runs, then does what billiard does
around a write to its result queue: blocks SIGTERM in the main thread, and the SIGTERM comes
(here, from itself). A thread that does not block SIGTERM would take it, and CPython would run
the handler in the main thread at once; blocked everywhere, it stays pending until the main
thread unblocks it. Notes whether the handler ran while blocked, and after. The event is
delivered at exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import probe  # before whisperr: see probe's docstring

import whisperr

make = whisperr.Client if sys.argv[1] == "sync" else whisperr.AsyncClient
client = probe.watch(make(on_error=probe.on_error))
client.track("masked", "payment_failed", message_id="signal-mask-0")
deadline = time.monotonic() + 5
while not any(t.name == "whisperr-delivery" for t in threading.enumerate()):
    assert time.monotonic() < deadline, "the delivery thread never started"
    time.sleep(0.01)

handled: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
os.kill(os.getpid(), signal.SIGTERM)
total = 0
for i in range(1_000_000):  # Python work: a handler pending for this thread would run here
    total += i
while_blocked = len(handled)
signal.pthread_sigmask(signal.SIG_SETMASK, previous)
for i in range(1_000):  # the handler runs at the next instruction boundary once unblocked
    total += i
probe.note(handled_while_blocked=while_blocked, handled_after=len(handled))
