"""Process life: what every client does at interpreter exit, after a fork, and on SIGTERM.

- At interpreter exit (``atexit``), every client not closed delivers what it holds within its
  ``shutdown_timeout``, then reports the rest.
- In a forked child, every client starts empty (the parent's queue stays the parent's), and
  ``os._exit`` first delivers what the child tracked: ``multiprocessing`` and billiard (Celery's
  prefork pool) end their children with ``os._exit``, which skips ``atexit``.
- :func:`exit_on_sigterm`, the opt-in for plain scripts and workers: SIGTERM becomes a normal
  exit (``SystemExit(143)``), so the exit delivery above runs.
- Signals stay with the app's threads: the delivery thread blocks them (see
  :func:`start_blocking_signals`), except while it runs the app's code (:func:`app_signals`)
  and in a process forked from it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn, Protocol

logger = logging.getLogger("whisperr")


class _Lifelong(Protocol):
    def _after_fork(self) -> None: ...
    def _close_at_exit(self) -> None: ...


_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_real_exit: Callable[[int], NoReturn] = os._exit


def register(client: _Lifelong) -> None:
    """Include ``client`` in the exit and fork handling, for as long as it lives."""
    _clients.add(client)


def _close_all() -> None:
    for client in list(_clients):
        try:
            client._close_at_exit()
        except Exception:  # one client must not keep the others from delivering
            logger.exception("whisperr: delivering at exit failed")


def _after_fork_in_child() -> None:
    if threading.get_ident() in _blocking:  # forked from the delivery thread: take signals
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
    _blocking.clear()
    for client in list(_clients):
        client._after_fork()
    os._exit = _exit_delivering


def _exit_delivering(status: int) -> NoReturn:
    """``os._exit`` in a forked child: deliver what this process tracked, then exit."""
    _close_all()
    _real_exit(status)


# The signals the delivery thread blocks: all that can be, but those a fault raises in the
# faulting thread. The kernel hands a process-directed signal to any thread that does not block
# it, and CPython then runs the Python handler in the main thread at once, even where the main
# thread blocks that signal. billiard (Celery's prefork pool) blocks SIGTERM while a child
# writes to the pool's result queue, because a handler run there leaves the queue locked and
# the pool wedged: an unblocked thread of ours in the child would defeat that.
_UNBLOCKED = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP"}
_BLOCKED = (
    {s for s in signal.valid_signals() if getattr(s, "name", "") not in _UNBLOCKED}
    if hasattr(signal, "pthread_sigmask")
    else set()
)
_blocking: set[int] = set()  # idents of the threads started by start_blocking_signals()


def start_blocking_signals(
    name: str, target: Callable[..., object], *args: object
) -> threading.Thread:
    """Run ``target(*args)`` on a new daemon thread with ``_BLOCKED`` blocked from its first
    instruction on (a new thread inherits its creator's mask; the creator's own is restored at
    once); the thread, started.

    Raises:
        RuntimeError: the interpreter is exiting, and no thread may start.
    """

    def run() -> None:
        _blocking.add(threading.get_ident())
        try:
            target(*args)
        finally:
            _blocking.discard(threading.get_ident())

    thread = threading.Thread(target=run, name=name, daemon=True)
    if not _BLOCKED:  # Windows: no signal masks, and no fork
        thread.start()
        return thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


@contextlib.contextmanager
def app_signals() -> Iterator[None]:
    """Run the app's code (an ``on_error`` hook) with signals unblocked on the delivery thread:
    a process it starts inherits the mask of the thread that starts it, and must take them."""
    if threading.get_ident() not in _blocking:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal interpreter exit, so that queued events are delivered.

    A process stopped with SIGTERM (``docker stop``, ``kill``, a process manager) dies at once
    by default, and what it still holds in memory is lost. After this call, SIGTERM raises
    ``SystemExit(143)`` in the main thread instead: ``finally`` blocks and context managers
    unwind, and the exit delivery runs (within ``shutdown_timeout``). A handler installed
    before is called first. Call it from the main thread of a plain script or worker; servers
    and frameworks that handle SIGTERM themselves (uvicorn, gunicorn, Celery) need nothing.

    Raises:
        ValueError: not called from the main thread (a limit of ``signal.signal``).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("whisperr.exit_on_sigterm() must be called from the main thread")
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "whisperr_exit", False):
        return  # installed already: calling it again changes nothing

    def handler(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        sys.exit(128 + signum)

    handler.whisperr_exit = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, handler)


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
