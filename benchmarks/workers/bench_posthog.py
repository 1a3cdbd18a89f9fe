"""Worker for posthog: its own protocol, sent to the lenient endpoint.

It POSTs ``{host}/batch/``, so ``host`` is ``<server>/_lenient``. Defaults except
``max_queue_size`` (and no flush timeout: the benchmark's own budget bounds the wait).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import _common
from posthog import Posthog


def make(url: str, queue_size: int) -> Posthog:
    return Posthog("phc_bench", host=f"{url}/_lenient", max_queue_size=queue_size)


def track(client: Posthog, i: int, props: dict[str, Any]) -> None:
    client.capture(_common.EVENT_TYPE, distinct_id=_common.USERS[i % 1000], properties=props)


if __name__ == "__main__":
    _common.quiet_loggers("posthog", "urllib3")
    _common.thread_sdk_main(
        "posthog",
        version("posthog"),
        make,
        track,
        flush=lambda c: c.flush(timeout_seconds=None),
        shutdown=lambda c: c.shutdown(),
    )
