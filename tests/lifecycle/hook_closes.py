"""Case 7: an async on_error hook that awaits client.aclose(), while the app awaits it too.

Usage: hook_closes.py WHEN    (the server is down)
    during  max_retries=0: each failed attempt is reported at once, so the hook's aclose()
            runs while the app's aclose() is still waiting for delivery
    end     default retries: the reports come when the app's aclose() gives up (its timeout)

shutdown_timeout=3. Notes how long the app's aclose() took.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import probe  # before whisperr: see probe's docstring

import whisperr

N = 100
WHEN = sys.argv[1]


async def main() -> None:
    client: Any = None

    async def hook(report: whisperr.DeliveryReport) -> None:
        probe.on_error(report)
        await client.aclose()

    extra = {"max_retries": 0} if WHEN == "during" else {}
    client = probe.watch(whisperr.AsyncClient(on_error=hook, shutdown_timeout=3, **extra))
    for i in range(N):
        client.track(f"user_{i % 7}", "payment_failed", {"i": i}, message_id=f"hook-{i}")
    started = time.monotonic()
    await client.aclose()
    probe.note(aclose_seconds=time.monotonic() - started)


asyncio.run(main())
probe.mark("run_returned")
