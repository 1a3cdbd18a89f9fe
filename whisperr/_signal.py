"""A one-shot signal set from any thread, awaited from any event loop or waited on in any thread.

The runner may live in a caller's event loop or on the client's own thread; ``flush()`` and
``aclose()`` may be called from another loop in another thread, or block in a plain thread.
anyio's ``Event`` belongs to one loop, so the waiter registers a callback that wakes its own
loop through that loop's thread-safe scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable

import anyio

Schedule = Callable[[Callable[[], None]], object]


def loop_here() -> tuple[Schedule, asyncio.AbstractEventLoop | None] | None:
    """The thread-safe ``call_soon`` of the event loop running in this thread (and the loop, for
    asyncio); None outside of one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe, loop
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None
    return token.run_sync_soon, None


class Signal:
    """Set once; every waiter, in whatever thread or loop, is woken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._wakes: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            wakes, self._wakes = self._wakes, []
        for wake in wakes:
            with contextlib.suppress(RuntimeError):  # that waiter's loop ended: nobody waits
                wake()

    async def wait(self, timeout: float | None) -> bool:
        """Wait in the current event loop, at most ``timeout`` seconds; whether it was set."""
        here = loop_here()
        assert here is not None
        schedule = here[0]
        event = anyio.Event()

        def wake() -> None:
            schedule(event.set)

        if not self._add(wake):
            return True
        try:
            with anyio.move_on_after(timeout):
                await event.wait()
        finally:
            self._discard(wake)
        return self._set

    def wait_blocking(self, timeout: float | None) -> bool:
        """Block this thread at most ``timeout`` seconds; whether it was set."""
        event = threading.Event()
        if not self._add(event.set):
            return True
        try:
            event.wait(timeout)
        finally:
            self._discard(event.set)
        return self._set

    def _add(self, wake: Callable[[], None]) -> bool:
        with self._lock:
            if self._set:
                return False
            self._wakes.append(wake)
            return True

    def _discard(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._wakes:
                self._wakes.remove(wake)
