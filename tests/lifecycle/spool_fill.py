"""Track N events with a spool, then end: await aclose(timeout=1), or return without it.

Usage: spool_fill.py N IDS_FILE {aclose|loop_end} [identify]

Settings come from the WHISPERR_* environment (WHISPERR_SPOOL_PATH and the rest). The message
ids track() returned are written to IDS_FILE, one JSON line {"id": ..., "t": time.time() just
before the call}. With `identify`, one identify() call precedes the events (never spooled).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import probe  # before whisperr: see probe's docstring
import spool_common  # before whisperr: see its docstring

import whisperr

N = int(sys.argv[1])
IDS_FILE = sys.argv[2]
END = sys.argv[3]
IDENTIFY = "identify" in sys.argv[4:]
lines: list[str] = []


async def main() -> None:
    client = probe.watch(whisperr.AsyncClient(on_error=probe.on_error))
    if IDENTIFY:
        client.identify("spool_user", {"plan": "pro"})
    for i in range(N):
        before = time.time()
        message_id = client.track(f"user_{i % 7}", "payment_failed", {"i": i})
        lines.append(json.dumps({"id": message_id, "t": before}))
    probe.mark("tracked")
    spool_common.say("TRACKED", count=N)
    if END == "aclose":
        result = await client.aclose(timeout=1)
        probe.note(aclose={"delivered": result.delivered, "pending": result.pending})
        probe.note(closed=spool_common.full_stats(client))
    probe.mark("main_returned")


asyncio.run(main())
probe.mark("run_returned")
with open(IDS_FILE, "w") as out:  # before the exit hooks: whisperr spools there (loop_end)
    out.write("".join(line + "\n" for line in lines))
