"""Celery: a worker's pool processes deliver what each task tracked before they go on or end.

    app = Celery("tasks")
    whisperr.init()
    whisperr.celery.setup(app)

After each task of ``app`` (``task_postrun``), the pool process blocks until what was tracked
so far is settled, for at most ``flush_timeout``: events do not wait in memory of a process
that a time limit, a ``--max-tasks-per-child`` recycle, an OOM kill or a deploy ends next.
When the pool process ends (``worker_process_shutdown``), the client is closed within
``shutdown_timeout``. A forked pool process needs nothing at start (``worker_process_init``):
every client starts empty after a fork, the master's queue stays the master's.

Importing ``whisperr`` never imports Celery; this module does, when it is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from celery import Celery, signals

from . import _scope
from ._client import AsyncClient
from ._compat import Whisperr
from ._default import get_client
from ._errors import WhisperrError
from ._runner import RunnerState
from ._scope import RequestScope
from ._sync import Client

__all__ = ["setup"]

AnyClient = Client | Whisperr | AsyncClient


def setup(
    app: Celery,
    client: AnyClient | None = None,
    *,
    flush_timeout: float = 2.0,
    shutdown_timeout: float | None = None,
) -> None:
    """Flush ``client`` after each task of ``app``, and close it when a pool process ends.

    Each task also runs in a scope of its own (``whisperr.bind()``, nobody signed in): a
    ``whisperr.bind_user()`` in one task never carries over to the next in the same process.
    Call it where the app is made (the module ``celery -A`` imports). A second call for the
    same app replaces the first. A task run eagerly (``apply()``, ``task_always_eager``) runs
    in the caller's process and is not flushed after: the caller's client delivers it as usual.

    Args:
        app: the Celery app whose tasks are flushed after.
        client: a :class:`Client`, :class:`Whisperr` or :class:`AsyncClient`; None (the
            default) means the module-level client (``whisperr.init()``), looked up at each
            signal, so it may be made later, in each pool process. Without one there is
            nothing to deliver, and nothing is done.
        flush_timeout: the most a pool process waits after a task; what is still pending then
            stays queued and is delivered later, counted in ``stats()``.
        shutdown_timeout: the most a pool process waits at its end; default the client's
            ``shutdown_timeout`` setting. What is left then is counted as dropped and reported.

    Raises:
        TypeError: ``client`` is not a whisperr client.
        ValueError: a timeout is negative.
    """
    if client is not None and not isinstance(client, Client | Whisperr | AsyncClient):
        raise TypeError(f"whisperr.celery.setup() needs a whisperr client, got {client!r}")
    if flush_timeout < 0 or (shutdown_timeout is not None and shutdown_timeout < 0):
        raise ValueError("whisperr.celery.setup(): timeouts must not be negative")

    scopes: dict[str, contextvars.Token[RequestScope | None]] = {}

    def scope_task(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if getattr(sender, "app", None) is app and not sender.request.is_eager:
            scopes[task_id] = _scope._current.set(RequestScope())

    def flush_after_task(sender: Any = None, task_id: str = "", **_: Any) -> None:
        token = scopes.pop(task_id, None)
        if token is not None:
            with contextlib.suppress(ValueError):  # set in another context: nothing to undo
                _scope._current.reset(token)
        if getattr(sender, "app", None) is not app or sender.request.is_eager:
            return
        target = _resolve(client)
        if target is not None:
            _flush(target, flush_timeout)

    def close_at_process_end(**_: Any) -> None:
        target = _resolve(client)
        if target is not None:
            _close(target, shutdown_timeout)

    uid = f"whisperr.celery:{id(app)}"  # the receivers hold the app: its id stays unique
    for signal, receiver in (
        (signals.task_prerun, scope_task),
        (signals.task_postrun, flush_after_task),
        (signals.worker_process_shutdown, close_at_process_end),
    ):
        signal.disconnect(dispatch_uid=uid)
        signal.connect(receiver, weak=False, dispatch_uid=uid)


def _resolve(client: AnyClient | None) -> AnyClient | None:
    if client is not None:
        return client
    try:
        return get_client()
    except WhisperrError:  # no whisperr.init() in this process: nothing tracked through it
        return None


def _flush(client: AnyClient, timeout: float) -> None:
    if not isinstance(client, AsyncClient):
        client.flush(timeout)
        return
    # AsyncClient has no public blocking flush; this is what Client.flush() does.
    runner = client._runner
    if runner.state is not RunnerState.CLOSED and not client.settings.disabled:
        runner.flush_blocking(timeout)


def _close(client: AnyClient, timeout: float | None) -> None:
    if isinstance(client, Whisperr):
        client.shutdown(timeout)
    elif isinstance(client, Client):
        client.close(timeout)
    else:  # AsyncClient has no public blocking close; this is what Client.close() does.
        client._runner.close_blocking(
            client.settings.shutdown_timeout if timeout is None else timeout
        )
