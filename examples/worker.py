"""A background worker (no event loop of its own) that reports job outcomes to Whisperr.

``whisperr.Client`` is the blocking facade for code like this, Celery tasks or cron jobs: the
same non-blocking ``track()``, with delivery on a private background thread. Leaving the
``with`` block delivers what is queued before returning.

Configuration comes from the environment: ``WHISPERR_API_KEY``, and ``WHISPERR_BASE_URL`` to
send somewhere other than the real API. To try it against the bundled local server:

    python -m whisperr.server --port 8787 --api-key wrk_local
    WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 python examples/worker.py
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import whisperr


class Job(NamedTuple):
    id: str
    user_id: str
    rows: int


# In a real worker these come from a queue; job-0003 is empty and fails.
JOBS = [
    Job("job-0001", "user_17", 120),
    Job("job-0002", "user_42", 3_400),
    Job("job-0003", "user_17", 0),
    Job("job-0004", "user_99", 58),
]


def export_rows(job: Job) -> int:
    """The actual work; raises on bad input."""
    if job.rows <= 0:
        raise ValueError("nothing to export")
    return job.rows


def main() -> int:
    # Settings.from_env() reads WHISPERR_API_KEY, WHISPERR_BASE_URL and the other WHISPERR_*
    # variables; whisperr.Client takes the same Settings (or keyword arguments) as AsyncClient.
    with whisperr.Client(whisperr.Settings.from_env()) as client:
        for job in JOBS:
            try:
                rows = export_rows(job)
            except ValueError as exc:
                event, properties = "job_failed", {"job_id": job.id, "error": str(exc)}
            else:
                event, properties = "job_completed", {"job_id": job.id, "rows": rows}
            # The job id as message_id makes the event idempotent: if the job is retried after a
            # crash and tracks again, the server keeps a single copy.
            client.track(job.user_id, event, properties, message_id=f"{job.id}:{event}")
            print(f"{job.id}: {event}")

    # Leaving the `with` block delivered everything queued (within shutdown_timeout, 10 s).
    stats = client.stats()
    print(
        f"tracked={stats.tracked} identified={stats.identified} "
        f"delivered={stats.delivered} dropped={stats.dropped}"
    )
    return 0 if stats.delivered == stats.tracked + stats.identified else 1


if __name__ == "__main__":
    sys.exit(main())
