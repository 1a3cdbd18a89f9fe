"""Publish a transactional outbox: each row is sent now, and marked only once it landed.

Your app writes the event into an ``outbox`` table in the same database transaction as the
change it describes; this relay sends each pending row with ``send()`` and marks it published
only after the receipt. The row's id is the event's ``$message_id`` and its ``created_at`` the
``occurred_at``, so a row sent twice (the relay died before marking it) is stored once, at its
original time. A retryable failure leaves the row for the next pass; another is marked failed.

    python examples/outbox_publisher.py outbox.db     # WHISPERR_API_KEY, WHISPERR_BASE_URL

The first run with a new database file fills it with three sample rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
from datetime import datetime, timedelta, timezone

import whisperr

SCHEMA = """
create table if not exists outbox (
    id text primary key,
    user_id text not null,
    event_type text not null,
    properties text not null,
    created_at text not null,
    state text not null default 'pending'
)
"""


def fill_samples(db: sqlite3.Connection) -> None:
    """What the app's own transactions would have written."""
    now = datetime.now(timezone.utc)
    minutes = timedelta(minutes=1)
    rows = [
        ("ob-0001", "user_8842", "payment_failed", {"amount_cents": 4900}, now - 9 * minutes),
        ("ob-0002", "user_8842", "plan_downgraded", {"to": "basic"}, now - 5 * minutes),
        ("ob-0003", "user_17", "seats_removed", {"before": 12, "after": 3}, now),
    ]  # fmt: skip
    with db:
        db.executemany(
            "insert into outbox (id, user_id, event_type, properties, created_at)"
            " values (?, ?, ?, ?, ?)",
            [(i, u, t, json.dumps(p), at.isoformat()) for i, u, t, p, at in rows],
        )


async def publish(db: sqlite3.Connection, client: whisperr.AsyncClient) -> tuple[int, int]:
    """One pass over the pending rows; returns how many were published and failed."""
    published = failed = 0
    pending = db.execute(
        "select id, user_id, event_type, properties, created_at from outbox"
        " where state = 'pending' order by created_at"
    ).fetchall()
    for row_id, user_id, event_type, properties, created_at in pending:
        try:
            receipt = await client.send(
                user_id,
                event_type,
                json.loads(properties),
                message_id=row_id,  # the same id on every try: stored once
                occurred_at=created_at,  # when it happened, not when it was relayed
                timeout=10,
            )
        except whisperr.SendError as error:
            if error.retryable:
                print(f"{row_id}: not yet ({error}); the next pass tries again")
                continue
            print(f"{row_id}: refused ({error.status} {error.code})")
            state, failed = "failed", failed + 1
        else:
            print(f"{row_id}: published (status {receipt.status}, attempts {receipt.attempts})")
            state, published = "published", published + 1
        with db:
            db.execute("update outbox set state = ? where id = ?", (state, row_id))
    return published, failed


async def main(path: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(SCHEMA)
        if db.execute("select count(*) from outbox").fetchone()[0] == 0:
            fill_samples(db)
        async with whisperr.AsyncClient() as client:  # WHISPERR_* from the environment
            published, failed = await publish(db, client)
    print(f"published={published} failed={failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "outbox.db")))
