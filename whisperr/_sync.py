"""Client: the blocking facade, for code without an event loop; delivery on its own thread."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, final

from . import _events as ev
from ._client import AsyncClient
from ._config import Settings, SettingsArgs
from ._models import FlushResult, Receipt, Stats
from ._runner import RunnerState
from ._send import REPORT_GRACE, SendJob, not_sent

if sys.version_info >= (3, 11):
    from typing import Unpack
elif TYPE_CHECKING:  # typing_extensions is no dependency: the annotations are never evaluated
    from typing_extensions import Unpack

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


@final
class Client:
    """A client for code without an event loop: WSGI apps, scripts, Celery and cron jobs.

    ``track()`` and ``identify()`` are the same non-blocking calls as on :class:`AsyncClient`
    and are safe from any thread; delivery runs on the client's own daemon thread with its own
    event loop, started when there is something to deliver. Close it with ``close()`` or
    ``with whisperr.Client(...) as client:``. A process that exits without closing it still
    delivers what is queued, within ``shutdown_timeout``; it never hangs the exit beyond that
    budget. After ``os.fork()`` the child's client starts empty; the parent keeps and delivers
    its own events.

    Args:
        settings: a :class:`Settings` (or the API key, as a string); keyword arguments override
            its fields. Fields given in neither are read from ``WHISPERR_*`` environment
            variables, else take their defaults.
        **overrides: any :class:`Settings` field.
    """

    def __init__(
        self, settings: Settings | str | None = None, **overrides: Unpack[SettingsArgs]
    ) -> None:
        self._async = AsyncClient(settings, **overrides)
        self._runner = self._async._runner
        self._runner.own_thread_only = True

    def __repr__(self) -> str:
        return f"<Client {self._async.settings.base_url} {self._runner.state.value}>"

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
        self._async.identify(
            external_user_id, traits, email=email, phone=phone, push_token=push_token,
            preferred_channel=preferred_channel, channels=channels,
        )  # fmt: skip

    def send(
        self,
        external_user_id: str,
        event_type: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        *,
        occurred_at: Any = None,
        message_id: str | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Deliver one event now and block for its receipt; see :meth:`AsyncClient.send`.

        Safe from any thread. Called on the delivery thread itself (from an ``on_error``
        hook) it cannot wait for that thread, and raises :class:`SendError` at once.
        """
        item = self._async._capture(
            external_user_id, event_type, properties, context, occurred_at, message_id
        )
        if isinstance(item, str):  # dropped by before_send
            return not_sent(item)
        body = ev.encode_event(item, self._async._base_tail)
        job = self._async._submit(body, item[4], identify=False, timeout=timeout, blocking=True)
        return self._wait(job)

    def identify_now(
        self,
        external_user_id: str,
        traits: Mapping[str, Any] | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        push_token: str | None = None,
        preferred_channel: str | None = None,
        channels: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Deliver an identify now and block for its receipt; see
        :meth:`AsyncClient.identify_now`."""
        body = self._async._identify_body(
            external_user_id, traits, email, phone, push_token, preferred_channel, channels
        )
        return self._wait(
            self._async._submit(body, "", identify=True, timeout=timeout, blocking=True)
        )

    def _wait(self, job: SendJob) -> Receipt:
        if not job.done.wait_blocking(job.remaining() + REPORT_GRACE):
            job.fail(job.stopped("no answer: the client's delivery did not report in time", 0))
        return job.result()

    def _drop_anonymous(self, event_type: object) -> None:
        self._async._drop_anonymous(event_type)

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Block until everything tracked before the call is settled, or ``timeout`` passes.

        Called on the delivery thread itself (from an ``on_error`` hook), it starts the flush
        and returns at once.
        """
        before = self._async._counts()
        if self._runner.state is RunnerState.CLOSED or self.settings.disabled:
            return self._async._result(before, timed_out=False)
        settled = self._runner.flush_blocking(timeout)
        return self._async._result(before, timed_out=not settled and timeout is not None)

    def close(self, timeout: float | None = None) -> FlushResult:
        """Deliver what is queued within ``timeout`` (default ``shutdown_timeout``), then stop.

        Everything not delivered by then is counted as dropped and reported.
        """
        before = self._async._counts()
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        finished = self._runner.close_blocking(timeout)
        return self._async._result(before, timed_out=not finished)

    def stats(self) -> Stats:
        """A frozen snapshot of the counters; see :meth:`AsyncClient.stats`."""
        return self._async.stats()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
