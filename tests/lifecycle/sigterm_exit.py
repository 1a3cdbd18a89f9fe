"""Case 6: whisperr.exit_on_sigterm() turns SIGTERM into a normal exit, so exit delivery runs.

Tracks 300 events on a sync whisperr.Client(), prints "ready", then blocks until signalled.
(Without the opt-in, SIGTERM kills the process with what is queued: documented as lost, so no
test asserts that.)
"""

from __future__ import annotations

import time

import probe  # before whisperr: see probe's docstring

import whisperr

client = probe.watch(whisperr.Client(on_error=probe.on_error))
whisperr.exit_on_sigterm()
for i in range(300):
    client.track(f"user_{i % 7}", "payment_failed", {"i": i}, message_id=f"sigterm-{i}")
probe.mark("ready")
print("ready", flush=True)
time.sleep(60)  # the test sends SIGTERM long before this ends
