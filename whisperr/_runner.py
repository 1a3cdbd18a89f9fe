"""The runner: the background work's life, in whichever host can serve it.

A host is where the runner's serve loop runs: a task of the caller's event loop (asyncio or
trio), or the client's own delivery thread with its own asyncio loop, used when no loop of the
caller can deliver (no loop ever ran in the tracking thread, the loop ended, a pre-fork
master). When a caller's loop ends without ``aclose()``, the runner keeps what was in flight
and moves to its own thread, which delivers the rest; at interpreter exit (and at ``os._exit``
in a forked child, see ``_exit``) what is left is delivered within ``shutdown_timeout``, on
the exiting thread if no thread may be started any more.

Lifetime: one per client, reset in a forked child. Its state is a :class:`RunnerState`; every
change of state or host happens under ``_lock``, from any thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio

# Imported now, not lazily by a delivery thread that a fork could catch halfway through it.
import anyio._backends._asyncio
import anyio.abc
import anyio.lowlevel
import attrs

from . import _events as ev
from . import _exit
from ._batches import Batch
from ._config import Settings
from ._delivery import Delivery
from ._intake import Intake
from ._ledger import Ledger, await_hook, in_hook
from ._schedule import Scheduler
from ._send import SendJob
from ._signal import Schedule, Signal, loop_here

if TYPE_CHECKING:
    from ._spooler import Spooler
    from ._transport import Pool

logger = logging.getLogger("whisperr")

FINAL_HOOK_BUDGET = 1.0  # seconds an async on_error hook may take over the reports at close
CANCEL_GRACE = FINAL_HOOK_BUDGET + 1.0  # after a cancel, the final reports and the pool close
LINGER = 5.0  # seconds the own thread stays idle before it ends (a later track() restarts it)
CLAIM_POLL = 0.02  # seconds between two looks at a claim of the spool's worker under way


class Ending(enum.Enum):
    """How one stay of the runner in a host ended."""

    DONE = "done"  # the serve loop returned: drained at close, or idle on the own thread
    CUT = "cut"  # cancelled: the caller's loop is ending, or a close ran out of time
    FAILED = "failed"  # an unexpected error (logged)


class RunnerState(enum.Enum):
    """Where the client's background work is in its life."""

    IDLE = "idle"  # no host serves: nothing was tracked yet, or a host ended with work done
    RUNNING = "running"  # a host serves the queue
    CLOSING = "closing"  # aclose()/close() began: intake closed, a host drains under a deadline
    CLOSED = "closed"  # everything was delivered or reported; nothing runs any more


@attrs.define(eq=False)
class Host:
    """One stay of the runner in an event loop: a caller's, or the own thread's."""

    schedule: Schedule  # the loop's thread-safe call_soon
    loop: asyncio.AbstractEventLoop | None  # asyncio's, to tell a closed loop; None for trio
    own: bool  # the client's own delivery thread (or the exiting thread, at exit)
    thread: int = 0  # the ident of the thread the loop runs in, once it runs
    done: Signal = attrs.field(factory=Signal)
    scope: anyio.CancelScope | None = None
    wakeup: anyio.Event | None = None
    # Starts the sends handed in, as tasks of the serve loop's group while it is open; only
    # from a task of the host's loop.
    start_sends: Callable[[], None] | None = None
    serving: bool = False  # the serve loop runs
    # Set while a task starts sends as they come (from the stay's first send on).
    sends_wakeup: anyio.Event | None = None
    # Starts async on_error hooks as tasks of the serve loop's group, while it is open.
    hooks: HookStarter | None = None
    # The tasks started whose coroutine has not run yet (see spawn): deliveries, sends, the
    # task that starts sends, async hooks.
    unstarted: dict[object, tuple[Any, ...]] = attrs.field(factory=dict)

    def ended(self) -> bool:
        return self.loop is not None and self.loop.is_closed()

    def wake(self) -> None:
        """Wake the serve loop; only from the host's own thread."""
        if self.wakeup is not None:
            self.wakeup.set()

    def wake_sends(self) -> None:
        """Wake the task that starts sends, or else the serve loop; only from the host's
        own thread."""
        if self.sends_wakeup is not None:
            self.sends_wakeup.set()
        else:
            self.wake()

    def cancel(self) -> None:
        """Cancel the serve loop; only from the host's own thread."""
        if self.scope is not None:
            self.scope.cancel()

    def spawn(
        self, tg: anyio.abc.TaskGroup, key: object, work: Coroutine[Any, Any, None], *also: Any
    ) -> None:
        """Run ``work`` as a task of ``tg``; it calls ``started(key)`` first.

        A task cancelled before its first step (the loop ended in the turn after it was
        started) never runs its coroutine, and anyio's task wrapper leaves it to warn "never
        awaited" at exit; ``close_unstarted()`` closes those instead (and the coroutines in
        ``also`` that ``work`` would have awaited), once the group is done.
        """
        try:
            tg.start_soon(_as_is, work, name=getattr(work, "__qualname__", None))
        except RuntimeError:  # the group has ended: ``also`` stays the caller's
            work.close()
            raise
        self.unstarted[key] = (work, *also)  # its task has not run yet

    def started(self, key: object) -> None:
        self.unstarted.pop(key, None)

    def close_unstarted(self) -> list[object]:
        """Close the coroutines that never ran; their keys, for the runner to settle."""
        keys = list(self.unstarted)
        for works in self.unstarted.values():
            for work in works:
                if inspect.iscoroutine(work):
                    work.close()
        self.unstarted.clear()
        return keys


def _as_is(work: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    return work


class HookStarter:
    """``Ledger.spawn`` while a task group of the runner is open: starts an async
    ``on_error`` hook's awaitable as a task of that group. Called from another thread (a
    report made by the spool's worker thread), it leaves the hook in the ledger's
    ``waiting_hooks`` and wakes the host's loop, whose runner starts it (``start_waiting()``,
    which also starts the hooks made while no group was open)."""

    def __init__(self, tg: anyio.abc.TaskGroup, host: Host, ledger: Ledger) -> None:
        self._tg = tg
        self._host = host
        self._ledger = ledger

    def __call__(self, hook: Awaitable[Any]) -> None:
        if threading.get_ident() == self._host.thread:
            self._start(hook)  # the task copies the caller's context (in_hook set)
            return
        self._ledger.waiting_hooks.append((contextvars.copy_context(), hook))
        try:
            self._host.schedule(self._host.wake)
        except RuntimeError:  # that loop has ended: another stay starts it
            self._ledger.wake_runner()
            return
        if self._ledger.spawn is not self:  # this group ended meanwhile, maybe past its last
            self._ledger.wake_runner()  # start_waiting(): the stay's end sees the hook waiting

    def start_waiting(self) -> None:
        """Start the hooks that wait for the runner; from a task of the host's loop."""
        waiting = self._ledger.waiting_hooks
        while waiting:
            context, hook = waiting.popleft()
            context.run(self._start, hook)

    def _start(self, hook: Awaitable[Any]) -> None:
        key = object()
        self._host.spawn(self._tg, key, self._run(key, hook), hook)

    async def _run(self, key: object, hook: Awaitable[Any]) -> None:
        self._host.started(key)
        await await_hook(hook)


class _OwnLoop(asyncio.SelectorEventLoop):
    """The own thread's loop: at interpreter exit, when no executor thread may start for
    ``getaddrinfo``, names are resolved on the loop's thread instead."""

    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().getaddrinfo(*args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            return socket.getaddrinfo(*args, **kwargs)


def _own_loop() -> tuple[Schedule, asyncio.AbstractEventLoop]:
    loop = _OwnLoop()
    return loop.call_soon_threadsafe, loop


class Runner:
    """Starts, wakes, moves and closes the serve loop; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        scheduler: Scheduler,
        delivery: Delivery,
        ledger: Ledger,
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._scheduler = scheduler
        self._delivery = delivery
        self._ledger = ledger
        self.own_thread_only = False  # the sync Client: never serve in a caller's loop
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self.state = RunnerState.IDLE
        self._host: Host | None = None
        self._next_capture_report = 0.0
        self._sends: collections.deque[SendJob] = collections.deque()  # not started yet
        self.sending: set[SendJob] = set()  # under way in the host that serves

    def after_fork(self) -> None:
        """In a forked child: the parent's host and work stay the parent's."""
        closed = self.state in (RunnerState.CLOSING, RunnerState.CLOSED)
        self._reset()
        if closed:
            self.state = RunnerState.CLOSED
            self._intake.close()

    @property
    def host_kind(self) -> str:
        host = self._host
        return "none" if host is None else "own thread" if host.own else "event loop"

    # -- start and wake, from any thread ---------------------------------------------------

    def kick(self) -> None:
        """Wake the serve loop, starting a host if none serves (the intake's wake callback)."""
        host = self._host
        if host is None or host.ended():
            self.start()
            return
        self._scheduler.hold_wakes()
        if threading.get_ident() == host.thread:
            host.wake()
            return
        try:
            host.schedule(host.wake)
        except RuntimeError:  # that loop has ended (trio: RunFinishedError)
            self._forget(host)
            self.start()

    def on_host_thread(self) -> bool:
        """Whether this thread runs the serve loop (it cannot block waiting for it)."""
        host = self._host
        return host is not None and host.thread == threading.get_ident()

    def submit(self, job: SendJob) -> None:
        """Hand a send to whichever host serves (started if none does); from any thread."""
        with self._lock:  # so that a stay ending now sees it, and another starts for it
            if self.state is RunnerState.CLOSED:
                job.fail(job.stopped("the client is closed", 0))
                self._ledger.settle_send(False)
                return
            self._sends.append(job)
            host = self._host
            if host is None or host.ended():
                self.start()
            elif host.thread == threading.get_ident():
                if host.start_sends is not None:
                    host.start_sends()  # a task of the serve loop itself (an on_error hook)
            else:
                try:
                    host.schedule(host.wake_sends)
                except RuntimeError:  # that loop has ended
                    self._forget(host)
                    self.start()

    def start(self, *, own_thread: bool = False) -> None:
        """Start serving: in this thread's running loop, else on the own thread."""
        if self._settings.disabled:
            self._ledger.drop_waiting_hooks("delivery is disabled")  # no stay ever comes
            return
        with self._lock:
            host = self._host
            if host is not None and host.ended():
                self._forget(host)
            if self.state is RunnerState.CLOSED:
                self._ledger.drop_waiting_hooks("the client closed")  # no stay will come
                return
            if self._host is not None:
                return
            here = None if own_thread or self.own_thread_only else loop_here()
            try:
                if here is None:
                    self._start_own_thread()
                else:
                    self._start_in(*here)
            except Exception:  # e.g. no file descriptor left for a loop: never out of track()
                logger.exception("whisperr: could not start delivery; the next event tries again")
                self._no_host()

    def _start_in(self, schedule: Schedule, loop: asyncio.AbstractEventLoop | None) -> None:
        host = self._host = Host(schedule, loop, own=False, thread=threading.get_ident())
        if self.state is RunnerState.IDLE:
            self.state = RunnerState.RUNNING
        if loop is not None:
            loop.create_task(self._serve_in(host), name="whisperr-runner")
        else:
            sys.modules["trio"].lowlevel.spawn_system_task(
                self._serve_in, host, name="whisperr-runner"
            )

    def _start_own_thread(self) -> None:
        host = self._host = Host(*_own_loop(), own=True)
        loop = host.loop
        assert loop is not None
        if self.state is RunnerState.IDLE:
            self.state = RunnerState.RUNNING
        try:
            _exit.start_blocking_signals("whisperr-delivery", self._run_own, host, None)
        except RuntimeError:  # the interpreter is exiting: the exit hook serves on its thread
            self._no_host()
            loop.close()

    def _no_host(self) -> None:
        """No host could start: the next wake (or the exit hook) tries again."""
        self._host = None
        if self.state is RunnerState.RUNNING:
            self.state = RunnerState.IDLE
        self._intake.wake_at = 1

    def _run_own(self, host: Host, timeout: float | None) -> None:
        """Run ``host``'s loop on this thread until the serve loop ends (within ``timeout``)."""
        loop = host.loop
        assert loop is not None
        try:
            loop.run_until_complete(self._serve_within(host, timeout))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception:  # the serve loop handles its own; this is the loop itself failing
            logger.exception("whisperr: the delivery thread failed; what it holds is kept")
            self._forget(host)
            self._scheduler.barriers.release_all()
        finally:
            loop.close()
            host.done.set()

    async def _serve_within(self, host: Host, timeout: float | None) -> None:
        with anyio.move_on_after(timeout):
            await self._serve_in(host)

    def _forget(self, host: Host) -> None:
        """A host's loop ended under the runner: keep its batches, and let another host start."""
        with self._lock:
            if self._host is host:
                self._host = None
                self._scheduler.cut_off()
                self._stop_sends(self.sending, "the event loop delivering it ended")
                if self.state is RunnerState.RUNNING:
                    self.state = RunnerState.IDLE
                self._intake.wake_at = 1

    # -- the serve loop, inside a host ------------------------------------------------------

    async def _serve_in(self, host: Host) -> None:
        host.thread = threading.get_ident()
        ending = Ending.CUT
        http = None
        try:
            http = self._delivery.open()
            with anyio.CancelScope() as host.scope:
                await self._serve(host, http)
                ending = Ending.DONE
        except Exception:
            logger.exception("whisperr: the runner failed; what it holds is kept")
            ending = Ending.FAILED
        finally:
            await self._leave(host, http, ending)

    async def _leave(self, host: Host, http: Pool | None, ending: Ending) -> None:
        if self._host is not host:  # forgotten (its loop was closed under it): nothing to do
            host.done.set()
            return
        restart = False
        # A close that began as an idle stay was ending is served by the next stay, not here.
        finalize = self.state is RunnerState.CLOSING and (
            ending is not Ending.DONE or self._scheduler.drained(time.monotonic())
        )
        try:
            with anyio.CancelScope(shield=True):
                self._scheduler.cut_off()  # cut off mid-request: kept, sent again (same ids)
                if finalize:
                    await self._final_reports(host, http)
                elif ending is Ending.CUT:
                    logger.info(
                        "whisperr: the event loop ended without aclose(); "
                        "the client's own thread delivers what is left"
                    )
                if http is not None:
                    await self._delivery.close(http)
        finally:
            with self._lock:
                self._host = None
                self._intake.wake_at = 1
                if finalize:
                    self.state = RunnerState.CLOSED
                    self._scheduler.barriers.close()
                    self._stop_sends(self._sends, "the client closed before the send began")
                elif self.state is RunnerState.CLOSING:
                    restart = True  # the close began during this stay's end: drain in another
                elif ending is Ending.FAILED:  # no retry loop: the next track() starts again
                    self.state = RunnerState.IDLE
                    self._scheduler.barriers.release_all()
                else:
                    self.state = RunnerState.IDLE
                    restart = (
                        not self._idle()
                        or self._ledger.capture_drops_pending
                        or bool(self._ledger.waiting_hooks)
                    )
                    if ending is Ending.CUT:  # a loop ended: deliver all it left at once
                        self._scheduler.barriers.drain_to = self._intake.end
            if finalize:  # the last stay: no runner will start the hooks still waiting
                self._ledger.drop_waiting_hooks("the client closed")
            host.done.set()
            if restart:
                self.start(own_thread=True)

    async def _serve(self, host: Host, http: Pool) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._ledger.spawn = host.hooks = HookStarter(tg, host, self._ledger)
                host.start_sends = functools.partial(self._start_sends, tg, host, http)
                host.serving = True
                try:
                    while (batch := await self._next_batch(host)) is not None:
                        if batch.identify:
                            await self._deliver(host, http, batch)
                        else:
                            host.spawn(tg, batch, self._deliver(host, http, batch))
                            # One batch taken at a time (a backlog's encoded in steps ahead of
                            # it): the app's own tasks run between two, so a deep queue never
                            # holds the loop for long.
                            await anyio.lowlevel.checkpoint()
                finally:
                    host.hooks.start_waiting()
                    self._ledger.spawn = host.hooks = None
                    host.serving = False
                    host.wake_sends()
        finally:
            host.start_sends = None
            self._settle_unstarted(host)

    def _settle_unstarted(self, host: Host) -> None:
        """Sends whose task never ran end as the cut-off sends they are (a batch never sent
        is in flight still, and kept by the stay's end)."""
        for key in host.close_unstarted():
            if isinstance(key, SendJob):
                self._end_send(host, key)

    async def _start_sends_as_they_come(self, host: Host) -> None:
        """Start each send handed in, at once (also while an identify is delivered inline),
        as long as the serve loop runs or sends are under way."""
        host.started(host)
        try:
            while True:
                if host.start_sends is not None:
                    host.start_sends()
                if not (host.serving or self.sending):
                    return
                host.sends_wakeup = wakeup = anyio.Event()
                if self._sends:  # handed in meanwhile: start them, yet let the others run
                    await anyio.lowlevel.checkpoint()
                else:
                    await wakeup.wait()
        finally:
            host.sends_wakeup = None

    def _start_sends(self, tg: anyio.abc.TaskGroup, host: Host, http: Pool) -> None:
        """Start the sends handed in, each a task of the serve loop's group (and, at the stay's
        first send, the task that starts the next ones as they come)."""
        if host.sends_wakeup is None and host.serving:
            host.sends_wakeup = anyio.Event()
            host.spawn(tg, host, self._start_sends_as_they_come(host))
        while self._sends:
            job = self._sends.popleft()
            self.sending.add(job)
            host.spawn(tg, job, self._send(host, http, job))

    async def _next_batch(self, host: Host) -> Batch | None:
        """Wait until a batch should go out and return it; None once this stay is over."""
        scheduler, ledger = self._scheduler, self._ledger
        interval = self._settings.flush_interval
        while True:
            if self._sends and host.start_sends is not None:
                host.start_sends()
            ev.top_up_ids()  # here, not on a caller's track() path
            if host.hooks is not None:
                host.hooks.start_waiting()
            now = time.monotonic()
            if scheduler.spooler is not None:
                self._replay(scheduler.spooler)
            if ledger.capture_drops_pending and (
                now >= self._next_capture_report or self.state is RunnerState.CLOSING
            ):
                self._next_capture_report = now + interval
                ledger.report_capture_drops()
            scheduler.release_waiters()
            if scheduler.encode_ahead():  # a deep queue: its next batch is encoded in steps,
                await anyio.lowlevel.checkpoint()  # and the app's own tasks run between two
                continue
            batch = scheduler.ready_batch(now, self.state is RunnerState.CLOSING)
            if batch is not None:
                return batch
            claiming = scheduler.spooler is not None and scheduler.spooler.claiming
            if self.state is RunnerState.CLOSING and scheduler.drained(now) and not claiming:
                return None
            deadline = scheduler.next_deadline(now)
            if ledger.capture_drops_pending:
                report_in = max(self._next_capture_report - now, 0.0)
                deadline = report_in if deadline is None else min(deadline, report_in)
            if claiming:  # the spool's worker wakes the runner only when it found events
                deadline = CLAIM_POLL if deadline is None else min(deadline, CLAIM_POLL)
            lingering = host.own and deadline is None and self._idle()
            woken = await self._wait(host, LINGER if lingering else deadline)
            if lingering and not woken and self._idle() and self.state is RunnerState.RUNNING:
                return None  # idle on the own thread: end it; the next track() starts another

    def _replay(self, spooler: Spooler) -> None:
        """Take what the spool's worker claimed; ask for more once it is on its way."""
        scheduler = self._scheduler
        claimed = spooler.take_claimed()
        if claimed:
            scheduler.replay(claimed)
        if self.state is not RunnerState.CLOSED and not scheduler.replaying():
            spooler.ask_claim()  # the worker wakes the runner (kick) when it has them

    def _idle(self) -> bool:
        return self._scheduler.idle() and not (self.sending or self._sends)

    async def _wait(self, host: Host, timeout: float | None) -> bool:
        host.wakeup = event = anyio.Event()
        with anyio.move_on_after(timeout):
            await event.wait()
        return event.is_set()

    async def _deliver(self, host: Host, http: Pool, batch: Batch) -> None:
        host.started(batch)
        scheduler = self._scheduler
        outcome, failed = None, False
        try:
            outcome = await self._delivery.attempts(http, batch, scheduler.attempted)
        except Exception:
            logger.exception("whisperr: unexpected error while delivering; the batch is kept")
            failed = True
        finally:
            if self._host is not host:
                pass  # forgotten with its loop: the batch was kept already
            elif failed:
                scheduler.failed(batch, time.monotonic())
            else:  # outcome None: cancelled mid-request, kept; it may be retried
                scheduler.settle(batch, outcome, time.monotonic())
            host.wake()

    async def _send(self, host: Host, http: Pool, job: SendJob) -> None:
        host.started(job)
        try:
            await self._delivery.send_now(http, job)
        except Exception:
            logger.exception("whisperr: unexpected error while sending")
            job.fail(job.stopped("unexpected error while sending (logged)", 0))
        finally:
            self._end_send(host, job)

    def _end_send(self, host: Host, job: SendJob) -> None:
        if not job.done.is_set():  # cancelled: the close ran out of time, or the loop ended
            job.fail(
                job.stopped(
                    "cut off before it landed: the client closed, or its event loop ended", 0
                )
            )
        self.sending.discard(job)
        self._ledger.settle_send(job.error is None)
        host.wake_sends()
        host.wake()  # the serve loop may be waiting for the client to become idle

    def _stop_sends(self, jobs: set[SendJob] | collections.deque[SendJob], why: str) -> None:
        for job in list(jobs):
            job.fail(job.stopped(why, 0))
            self._ledger.settle_send(False)
        jobs.clear()

    async def _final_reports(self, host: Host, http: Pool | None) -> None:
        """At close: report everything left; an async hook gets a second for the reports
        (and for a send it makes: an alert, say)."""
        try:
            with anyio.move_on_after(FINAL_HOOK_BUDGET):
                async with anyio.create_task_group() as tg:
                    self._ledger.spawn = hooks = HookStarter(tg, host, self._ledger)
                    if http is not None:
                        host.start_sends = functools.partial(self._start_sends, tg, host, http)
                    self._scheduler.account_undelivered()
                    if self._scheduler.spooler is not None:
                        self._scheduler.spooler.close()  # the last writes, on this thread
                    self._ledger.report_capture_drops()
                    hooks.start_waiting()  # reports the spool's thread made meanwhile
        finally:
            self._ledger.spawn = None
            host.start_sends = None
            self._settle_unstarted(host)  # sends whose task the loop's end cut off

    # -- flush and close -------------------------------------------------------------------

    async def flush(self, timeout: float | None) -> bool:
        """Wait in this loop until everything tracked before the call settles; False on timeout.

        From inside an ``on_error`` hook it starts the flush and returns True at once."""
        waiter = self._scheduler.barriers.add(self._intake.end)
        try:
            self.kick()
            if in_hook.get():
                return True  # the runner calling the hook cannot also be awaited by it
            return await waiter.done.wait(timeout)
        finally:
            self._scheduler.barriers.remove(waiter)

    def flush_blocking(self, timeout: float | None) -> bool:
        """:meth:`flush` for a thread without a loop; never blocks the host's own thread."""
        waiter = self._scheduler.barriers.add(self._intake.end)
        try:
            self.kick()
            host = self._host
            if in_hook.get() or (host is not None and host.thread == threading.get_ident()):
                return True  # started, not waited for: the host's own thread cannot wait
            return waiter.done.wait_blocking(timeout)
        finally:
            self._scheduler.barriers.remove(waiter)

    def begin_close(self) -> None:
        """Stop intake and make the next stay a draining one (idempotent, any thread)."""
        with self._lock:
            if self.state in (RunnerState.CLOSING, RunnerState.CLOSED):
                return
            self._intake.close()
            self._scheduler.barriers.new_round()
            self.state = RunnerState.CLOSING
            if self._settings.disabled:
                self.state = RunnerState.CLOSED

    async def aclose(self, timeout: float) -> bool:
        """Close from a running loop, within ``timeout``; False if it had to be cut short."""
        self.begin_close()
        if in_hook.get():
            self.kick()
            return True
        deadline = time.monotonic() + timeout
        while self.state is not RunnerState.CLOSED:
            self.start()  # in this loop, if no host serves
            host = self._host
            if host is None:
                return False  # no host could start (logged)
            self.kick()
            if not await host.done.wait(max(deadline - time.monotonic(), 0.0)):
                self._cancel(host)
                await host.done.wait(CANCEL_GRACE)
                return False
            # A stay that was ending as the close began ends without closing: serve again.
        return True

    def close_blocking(self, timeout: float) -> bool:
        """Close from a thread without a running loop (the sync Client, exit), within
        ``timeout``; False if it had to be cut short. Serves on this thread if it must."""
        self.begin_close()
        if in_hook.get():
            self.kick()
            return True  # started, not waited for (see aclose)
        deadline = time.monotonic() + timeout
        while self.state is not RunnerState.CLOSED:
            remaining = max(deadline - time.monotonic(), 0.0)
            with self._lock:
                host = self._host
                if host is not None and host.ended():
                    self._forget(host)
                    host = None
                inline = host is None and loop_here() is None
                if inline:
                    host = self._host = Host(*_own_loop(), own=True)
                elif host is None:  # called inside a running loop: a thread must serve
                    self._start_own_thread()
                    host = self._host
            if host is None:
                return False
            if inline:
                self._run_own(host, remaining)
                continue
            if host.thread == threading.get_ident():
                self.kick()
                return True  # the host's own thread (a sync hook) cannot wait for itself
            self.kick()
            if not host.done.wait_blocking(remaining):
                self._cancel(host)
                host.done.wait_blocking(CANCEL_GRACE)
                return False
        return True

    def close_at_exit(self) -> None:
        """At interpreter exit (or ``os._exit`` in a forked child): deliver what is left."""
        if self.state is RunnerState.CLOSED:
            return
        host = self._host
        if host is not None and not host.own and host.loop and not host.loop.is_running():
            self._forget(host)  # a caller's loop that will not run again
        spooler = self._scheduler.spooler
        busy = self._host is not None or not self._scheduler.idle()
        busy = busy or (spooler is not None and spooler.replay_due())
        if not busy and not self._ledger.capture_drops_pending:
            if spooler is not None:
                spooler.close()  # its deletions, and this client's claims
            # Its last writes may report, and an async hook then waits or already runs.
            if self._host is None and not self._ledger.waiting_hooks:
                return
        self.close_blocking(self._settings.shutdown_timeout)

    def _cancel(self, host: Host) -> None:
        with contextlib.suppress(RuntimeError):  # its loop ended: nothing left to cancel
            host.schedule(host.cancel)
