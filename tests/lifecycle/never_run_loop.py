"""Case 2: whisperr.init() at import, tracks from the main thread and 4 threads, no event loop.

The process exits without closing anything; no event loop ever runs in it.
"""

from __future__ import annotations

import threading

import probe  # before whisperr: see probe's docstring

import whisperr

PER_THREAD = 100

probe.watch(whisperr.init(on_error=probe.on_error))


def work(name: str) -> None:
    for i in range(PER_THREAD):
        whisperr.track(f"user_{name}", "payment_failed", {"i": i}, message_id=f"{name}-{i}")


work("main")
threads = [threading.Thread(target=work, args=(f"thread{n}",)) for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
probe.mark("work_done")
