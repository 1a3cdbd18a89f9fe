"""Case 1: asyncio.run(main()) tracks N events on AsyncClient() and returns without aclose().

Usage: loop_end.py N    (settings come from the WHISPERR_* environment)
"""

from __future__ import annotations

import asyncio
import sys

import probe  # before whisperr: see probe's docstring

import whisperr

N = int(sys.argv[1])


async def main() -> None:
    client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    for i in range(N):
        client.track(f"user_{i % 7}", "payment_failed", {"i": i}, message_id=f"case-{i}")
    probe.mark("main_returned")


asyncio.run(main())
probe.mark("run_returned")
