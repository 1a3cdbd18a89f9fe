"""Report churn signals from a trio program: the SDK runs on trio through anyio.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 \
        python examples/trio_script.py
"""

from __future__ import annotations

import sys

import trio

import whisperr

ACCOUNTS = {"user_101": 3, "user_102": 0, "user_103": 7}  # user id -> logins this month


async def review(client: whisperr.AsyncClient, user_id: str, logins: int) -> None:
    await trio.lowlevel.checkpoint()  # stands in for real async work (a query, an API call)
    if logins == 0:
        client.track(user_id, "account_inactive", {"days_since_login": 30})
    else:
        client.track(user_id, "usage_reviewed", {"logins_this_month": logins})


async def main() -> int:
    # The same AsyncClient as under asyncio; Settings.from_env() reads the WHISPERR_* variables.
    # One client serves every task of the nursery: track() is a plain call, safe from any of them.
    settings = whisperr.Settings.from_env()
    async with whisperr.AsyncClient(settings) as client, trio.open_nursery() as nursery:
        for user_id, logins in ACCOUNTS.items():
            nursery.start_soon(review, client, user_id, logins)

    # Leaving `async with` closed the client, delivering everything queued.
    stats = client.stats()
    print(
        f"tracked={stats.tracked} identified={stats.identified} "
        f"delivered={stats.delivered} dropped={stats.dropped}"
    )
    return 0 if stats.delivered == stats.tracked + stats.identified else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
