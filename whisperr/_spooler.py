"""The client's side of the durable spool: what goes to the file and comes back, off the loop.

One worker thread per client does every read and write of the SQLite file (``_spool.Spool``),
so neither ``track()`` nor the event loop ever waits for the disk or for a lock another process
holds. Callers hand it work through deques (an append is atomic, so ``track()`` pays no lock):

- ``spill``: events that could not be delivered (queue overflow, what is left at close), written
  free for any process to replay;
- ``journal`` (``spool_mode="always"``): every queued event, written as this client's own
  within ``spool_sync_interval``, so that a SIGKILL loses at most that window;
- ``forget``: the message ids of spooled events that were delivered, or dropped for good;
- a claim: the runner asks for the next spooled events to replay; the worker claims them
  atomically (other processes may share the file), then wakes the runner, which takes them.

At close (``close()``, from the closing thread) the worker stops and the last writes are made on
that thread: the journal, the spills, the deletions, then this client's rows are freed for the
next one. Lifetime: one per client with ``spool_path`` set; reset in a forked child.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from . import _events as ev
from . import _exit
from ._config import Settings
from ._ledger import Ledger, events
from ._spool import Added, Spool, SpoolBusy

logger = logging.getLogger("whisperr")
T = TypeVar("T")

HEARTBEAT = 5.0  # seconds between two heartbeats of this owner (the claim timeout is longer)
CLAIM_TIMEOUT = 30.0  # seconds without a heartbeat after which another process takes over
CLAIM_HOLD = 1.0  # seconds the queue may wait for a claim under way (spooled events go first)


class Spooler:
    """See the module docstring."""

    def __init__(self, settings: Settings, ledger: Ledger, store: Spool) -> None:
        self.always = settings.spool_mode == "always"
        self.path = str(settings.spool_path)
        self._interval = settings.spool_sync_interval
        self._batch_size = settings.max_batch_size
        self._ledger = ledger
        self._store = store
        self.wake_runner: Callable[[], None] = lambda: None  # set by the client: runner.kick
        # Made once, emptied in a forked child (never replaced: the client's put holds journal).
        self.journal: collections.deque[ev.Item] = collections.deque()
        self.spills: collections.deque[ev.Item] = collections.deque()  # left at close
        self.overflow: collections.deque[ev.Item] = collections.deque()
        self._forget: collections.deque[str] = collections.deque()
        self._claimed: collections.deque[list[ev.Item]] = collections.deque()
        self._reset()

    @classmethod
    def open(cls, settings: Settings, ledger: Ledger) -> Spooler | None:
        """The spooler for ``settings.spool_path``; None (memory only, logged) if the file
        cannot be used."""
        assert settings.spool_path is not None
        store = Spool.open(
            str(settings.spool_path),
            max_bytes=settings.spool_max_bytes,
            claim_timeout=CLAIM_TIMEOUT,
            clock=settings.clock,
        )
        return None if store is None else cls(settings, ledger, store)

    def _reset(self) -> None:
        for queue in (self.journal, self.spills, self.overflow, self._forget, self._claimed):
            queue.clear()
        self._kept: list[ev.Item] = []  # left at close, held in the file already
        self._wake = threading.Event()
        self._lock = threading.Lock()  # the worker's start and stop
        self._thread: threading.Thread | None = None
        self._closed = False
        self.claiming = False  # a claim was asked for and has not come back yet
        self._claim_asked = 0.0  # when (time.monotonic())
        self.exhausted = False  # the last claim found nothing more to replay
        self._replaying = False  # claims are bringing events back (logged once when they start)
        self._next_heartbeat = 0.0

    def after_fork(self) -> None:
        """In a forked child: the parent's rows, journal and worker stay the parent's."""
        self._store.after_fork()
        self._reset()

    # -- from any thread -----------------------------------------------------------------

    def spill(self, items: list[ev.Item]) -> None:
        """Hand over the tracks left at close (counted ``spooled``); ``close()`` writes them."""
        self._ledger.spool(len(items))
        self.spills.extend(items)

    def keep(self, items: list[ev.Item]) -> None:
        """Tracks left at close that this client holds in the file already (replayed, or
        journaled); ``close()`` writes again those the file lost meanwhile (evicted by the
        bound), so that each one counted ``spooled`` is in the file or reported."""
        self._ledger.spool(len(items))
        self._kept.extend(items)

    def spill_overflow(self, item: ev.Item, queued: bool) -> None:
        """An event the queue had no room for (the intake's spill, on the caller's path).

        Written free for any process to replay, also when it is journaled already: a journaled
        row is this client's own, which the bound may evict while the client lives."""
        self._ledger.spool(1, refused=not queued)
        self.overflow.append(item)
        self._start()
        self._wake.set()

    def forget(self, message_ids: Iterable[str]) -> None:
        """Spooled events that need no replay any more: delivered, or dropped for good."""
        self._forget.extend(message_ids)
        self._start()

    def ask_claim(self) -> None:
        """Ask the worker for the next events to replay (the runner, when it has room)."""
        if self.claiming or self.exhausted or self._closed:
            return
        self._claim_asked = time.monotonic()
        self.claiming = True
        if self._start():
            self._wake.set()
            return
        try:  # no thread may start (the interpreter is exiting): claim on this one
            self._claim()
        except Exception:  # busy, or failed: nothing more is replayed by this client
            self.claiming, self.exhausted = False, True

    def holds_queue(self, now: float) -> bool:
        """Whether the queue waits for a claim under way, so that spooled events go first
        (for at most ``CLAIM_HOLD``: a file locked for longer never stops delivery)."""
        return self.claiming and now - self._claim_asked < CLAIM_HOLD

    def replay_due(self) -> bool:
        """Whether events of the file may be waiting for this client (at exit: serve them)."""
        return not self.exhausted or self.claiming or bool(self._claimed)

    def take_claimed(self) -> list[ev.Item]:
        """What the worker claimed since the last call (the runner)."""
        items: list[ev.Item] = []
        while self._claimed:
            items.extend(self._claimed.popleft())
        return items

    # -- the worker ----------------------------------------------------------------------

    def _start(self) -> bool:
        """Start the worker if it is not running; whether one runs."""
        if self._thread is not None or self._closed:
            return self._thread is not None
        with self._lock:
            if self._thread is not None or self._closed:
                return self._thread is not None
            try:
                self._thread = _exit.start_blocking_signals("whisperr-spool", self._run)
            except RuntimeError:  # the interpreter is exiting: close() writes on its thread
                self._thread = None
            return self._thread is not None

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval if self.always else HEARTBEAT)
            self._wake.clear()
            if self._closed:
                return
            try:
                self._write()
            except SpoolBusy:
                continue  # another process holds the file: what is pending waits a turn
            except Exception:
                logger.exception("whisperr: the spool failed; it is tried again in a moment")

    def _write(self) -> None:
        """One turn: the deletions, the writes, a heartbeat, and a claim if one was asked."""
        store = self._store
        forget = _drain(self._forget)  # before the journal: an id delivered is journaled already
        journal = _drain(self.journal)
        overflow, spills = _drain(self.overflow), _drain(self.spills)
        try:
            if journal:
                self._added(store.add(journal, owned=True))
                journal = []
            if overflow or spills:
                self._added(store.add(overflow + spills, owned=False))
        except SpoolBusy:
            self.journal.extendleft(reversed(journal))
            self.overflow.extendleft(reversed(overflow))
            self.spills.extendleft(reversed(spills))
            self._forget.extendleft(reversed(forget))
            raise
        except Exception as exc:
            self._lost(overflow + spills, exc)
            raise
        if overflow:
            self.exhausted = False  # replayed once the queue has room
            self._ledger.report(
                "spooled",
                "queue_overflow",
                f"{events(len(overflow))} the queue had no room for went to the spool "
                f"{self.path}; they are sent once it has room, or by a later client",
                None,
                len(overflow),
                tuple(item[4] for item in overflow),
            )
        if forget:
            try:
                store.remove(forget)
            except SpoolBusy:
                self._forget.extendleft(reversed(forget))
                raise
        now = time.monotonic()
        if now >= self._next_heartbeat:
            store.heartbeat()
            self._next_heartbeat = now + HEARTBEAT
            self.exhausted = False  # other processes may have spilled since: look again
        if self.claiming:
            self._claim()

    def _claim(self) -> None:
        try:
            claim = self._store.claim(self._batch_size)
        except SpoolBusy:
            self._wake.set()  # try again at the next turn
            raise
        except Exception:
            self.claiming = False
            self.exhausted = True  # logged by the caller; the spool is left as it is
            raise
        if claim.expired:
            self._ledger.replay(len(claim.expired))
            self._ledger.drop(claim.expired, "expired", "spooled past the server's 30-day window")
        if claim.items:
            if not self._replaying:
                self._replaying = True
                logger.info(
                    "whisperr: sending the events of the spool %s (first %d, oldest first)",
                    self.path,
                    len(claim.items),
                )
            self._ledger.replay(len(claim.items))
            self._claimed.append(claim.items)
        self.exhausted = len(claim.items) < self._batch_size and not claim.expired
        self._replaying = self._replaying and not self.exhausted
        self.claiming = False
        if claim.items:
            self.wake_runner()

    def _added(self, added: Added) -> None:
        evicted = added.evicted
        if evicted:
            # Events spooled before (by this client or another) leave the file: reported, not
            # counted again (each was counted ``spooled`` by the client that spilled it).
            ids = tuple(item[4] for item in evicted)
            self._ledger.report(
                "dropped",
                "spool_full",
                f"{len(evicted)} oldest spooled events dropped: the spool reached spool_max_bytes",
                None,
                len(evicted),
                ids,
                counted=True,
            )

    def _lost(self, items: list[ev.Item], exc: Exception) -> None:
        if items:
            self._ledger.unspool(len(items))
            self._ledger.drop(items, "spool_error", f"the spool could not take them: {exc!r}")

    # -- close ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker; make the last writes on this thread; free this client's rows for
        the next client. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self.claiming = False
        for _ in range(20):  # a file another process holds: a few tries, 200 ms each
            try:
                self._write()
                # Freed before what the file lost is written again: any row that write evicts
                # is then free, so it is reported (a row of a live owner is not: it is held).
                held = self._store.held_ids() if self._kept else set()
                self._store.release()
                self.spills.extend(item for item in self._kept if item[4] not in held)
                self._kept = []
                self._write()
                break
            except SpoolBusy:
                continue
            except Exception:
                logger.exception("whisperr: the spool failed at close")
                break
        else:
            lost = _drain(self.overflow) + _drain(self.spills) + self._kept
            self._lost(lost, SpoolBusy("the spool file stayed locked"))
        self._store.close()


def _drain(queue: collections.deque[T]) -> list[T]:
    """Everything in ``queue``, taken from the front (others may append meanwhile)."""
    items: list[T] = []
    while queue:
        items.append(queue.popleft())
    return items
