"""Worker for segment-analytics-python: its own protocol, sent to the lenient endpoint.

It POSTs ``{host}/v1/batch``, so ``host`` is ``<server>/_lenient``. Defaults except
``max_queue_size``.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import _common
from segment.analytics import Client


def make(url: str, queue_size: int) -> Client:
    return Client("bench_write_key", host=f"{url}/_lenient", max_queue_size=queue_size)


def track(client: Client, i: int, props: dict[str, Any]) -> None:
    client.track(user_id=_common.USERS[i % 1000], event=_common.EVENT_TYPE, properties=props)


if __name__ == "__main__":
    _common.quiet_loggers("segment", "urllib3")
    _common.thread_sdk_main(
        "segment",
        version("segment-analytics-python"),
        make,
        track,
        flush=lambda c: c.flush(),
        shutdown=lambda c: c.shutdown(),
    )
