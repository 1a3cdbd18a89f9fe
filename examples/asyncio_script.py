"""Report churn signals from a plain asyncio program.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/asyncio_script.py
"""

from __future__ import annotations

import asyncio
import sys

import whisperr


async def main() -> int:
    # Settings.from_env() reads WHISPERR_API_KEY, WHISPERR_BASE_URL and any other WHISPERR_*
    # variable; keyword arguments would override them.
    settings = whisperr.Settings.from_env()
    async with whisperr.AsyncClient(settings) as client:
        # identify() attaches traits and contact channels to your own user id.
        client.identify("user_8842", {"plan": "pro", "seats": 12}, email="ada@example.com")

        # track() validates and queues in microseconds; it never waits for the network.
        client.track("user_8842", "payment_failed", {"amount_cents": 4900, "attempt": 1})
        client.track("user_8842", "support_ticket_opened", {"topic": "billing"})
        client.track("user_8842", "seats_removed", {"before": 12, "after": 3})

        # flush() waits until everything queued so far is settled, e.g. before a checkpoint.
        result = await client.flush(timeout=10)
        print(f"flushed: {result.delivered} delivered, {result.pending} pending")

    # Leaving `async with` closed the client, delivering anything still queued.
    stats = client.stats()
    print(
        f"tracked={stats.tracked} identified={stats.identified} "
        f"delivered={stats.delivered} dropped={stats.dropped}"
    )
    return 0 if stats.delivered == stats.tracked + stats.identified else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
