"""Worker for the official SDK, whisperr 0.2.1 (one sender thread, urllib, a connection per batch).

Runs in its own venv: it also imports as ``whisperr``. Defaults except ``max_queue_size``.
"""

from __future__ import annotations

from typing import Any

import _common

import whisperr
from whisperr import Whisperr


def make(url: str, queue_size: int) -> Whisperr:
    return Whisperr(api_key="wrk_bench", base_url=url, max_queue_size=queue_size)


def track(client: Whisperr, i: int, props: dict[str, Any]) -> None:
    client.track(_common.USERS[i % 1000], _common.EVENT_TYPE, props)


if __name__ == "__main__":
    assert hasattr(whisperr, "Whisperr"), f"not the official SDK: {whisperr.__file__}"
    _common.thread_sdk_main(
        "official",
        whisperr.__version__,
        make,
        track,
        flush=lambda c: c.flush(),
        shutdown=lambda c: c.shutdown(),
    )
