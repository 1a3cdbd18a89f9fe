"""Client: a blocking facade that runs an AsyncClient on a private event-loop thread."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, final

from ._client import _CLOSED, _FINAL_HOOK_BUDGET, AsyncClient
from ._config import Settings
from ._errors import ClientClosedError
from ._models import FlushResult, Stats

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
logger = logging.getLogger("whisperr")
# Slack on top of a caller's timeout for the hop to the loop thread and back, and for an async
# on_error hook to take the reports made at close.
_MARGIN = 1.0 + _FINAL_HOOK_BUDGET


@final
class Client:
    """A client for code without an event loop: WSGI apps, scripts, Celery and cron jobs.

    ``track()`` and ``identify()`` are the same non-blocking calls as on :class:`AsyncClient`
    and are safe from any thread; delivery runs on a private daemon thread with its own event
    loop. Close it with ``close()`` or ``with whisperr.Client(...) as client:``. A process that
    exits without closing it still delivers what is queued, within ``shutdown_timeout``, from an
    ``atexit`` hook; it never hangs the exit beyond that budget. After ``os.fork()`` the child's
    client starts empty with its own thread; the parent keeps and delivers its own events.

    Args:
        settings: a :class:`Settings`; keyword arguments override its fields.
        **overrides: any :class:`Settings` field.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self._async = AsyncClient(settings, **overrides)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"<Client {self._async.settings.base_url} closed={self._closed}>"

    @property
    def settings(self) -> Settings:
        """The client's settings."""
        return self._async.settings

    def track(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
    ) -> str:
        """Queue an event; see :meth:`AsyncClient.track`. Never blocks."""
        self._ensure_thread()
        return self._async.track(
            external_user_id, event_type, properties, context,
            occurred_at=occurred_at, message_id=message_id,
        )  # fmt: skip

    def identify(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Queue an identify; see :meth:`AsyncClient.identify`. Never blocks."""
        self._ensure_thread()
        self._async.identify(
            external_user_id, traits, email=email, phone=phone, push_token=push_token,
            preferred_channel=preferred_channel, channels=channels,
        )  # fmt: skip

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Block until everything tracked before the call is settled, or ``timeout`` passes."""
        if self._closed:
            return self._async_result()
        return self._call(self._async.flush(timeout), timeout)

    def close(self, timeout: float | None = None) -> FlushResult:
        """Deliver what is queued within ``timeout`` (default ``shutdown_timeout``), then stop."""
        with self._lock:
            if self._closed:
                return self._async_result()
            self._closed = True
        atexit.unregister(self._at_exit)
        if timeout is None:
            timeout = self._async.settings.shutdown_timeout
        if self._loop is None or self._pid != os.getpid():
            self._ensure_thread(starting_close=True)
        before = self._async.stats()
        try:
            return self._call(self._async.aclose(timeout), timeout)
        except concurrent.futures.TimeoutError:
            logger.error("whisperr: close() overran its %.1fs budget; giving up", timeout)
            now = self._async.stats()
            return FlushResult(
                delivered=now.delivered - before.delivered,
                dropped=now.dropped - before.dropped,
                pending=now.queued + now.in_flight,
                timed_out=True,
            )
        finally:
            self._stop_thread()

    def stats(self) -> Stats:
        """A frozen snapshot of the counters; see :meth:`AsyncClient.stats`."""
        loop, thread = self._loop, self._thread
        if loop is None or self._closed or not loop.is_running():
            return self._async.stats()
        if thread is not None and threading.get_ident() == thread.ident:
            return self._async.stats()  # e.g. from the on_error hook, on the loop thread
        return self._call(_call_async(self._async.stats), None)

    def __enter__(self) -> Client:
        self._ensure_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ensure_thread(self, *, starting_close: bool = False) -> None:
        if self._loop is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._closed and not starting_close:
                raise ClientClosedError(_CLOSED)
            if self._loop is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # a forked child starts its own loop thread
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="whisperr-client", daemon=True)
            thread.start()
            asyncio.run_coroutine_threadsafe(self._async.__aenter__(), loop).result()
            self._loop, self._thread = loop, thread

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        self._ensure_thread(starting_close=True)
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(None if timeout is None else timeout + _MARGIN)

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_MARGIN)
        if not thread.is_alive():
            loop.close()

    def _async_result(self) -> FlushResult:
        return FlushResult(
            delivered=0, dropped=0, pending=self._async.stats().queued, timed_out=False
        )

    def _at_exit(self) -> None:
        if self._pid == os.getpid() and self._loop is not None:
            self.close()


async def _call_async(function: Callable[[], T]) -> T:
    return function()


def flush_after(
    client: Client | AsyncClient, *, timeout: float = 2.0
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a unit of work (a serverless handler, a job) to deliver what it tracked.

    When the decorated function returns or raises, the client is flushed for at most
    ``timeout`` seconds, so events are not left in memory of a process that may be frozen or
    killed right after. Plain functions take a :class:`Client`; ``async def`` functions an
    :class:`AsyncClient`. What is still pending after the budget stays queued and is counted
    in ``stats()``.

    Raises:
        TypeError: the client does not match the kind of function.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(function):
            if not isinstance(client, AsyncClient):
                raise TypeError("an async function needs an AsyncClient in flush_after()")
            return _flush_after_async(function, client, timeout)  # type: ignore[return-value]
        if not isinstance(client, Client):
            raise TypeError("a plain function needs a whisperr.Client in flush_after()")

        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            finally:
                client.flush(timeout)

        return wrapper

    return decorate


def _flush_after_async(
    function: Callable[P, Awaitable[T]], client: AsyncClient, timeout: float
) -> Callable[P, Awaitable[T]]:
    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        finally:
            await client.flush(timeout)

    return wrapper
