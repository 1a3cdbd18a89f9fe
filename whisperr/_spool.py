"""The spool: a durable copy of queued events in one SQLite file that processes share.

Lifetime: one :class:`Spool` per client (a new connection and a new owner in a forked child).
Every call blocks, briefly: a file locked by another connection raises :class:`SpoolBusy` after
``BUSY_TIMEOUT`` instead of waiting longer. A row belongs to an owner (a live process's
write-ahead copy, or rows it claimed to replay) or to nobody (free, for any process to claim);
an owner whose heartbeat is stale, or whose process is gone, is dead and its rows are free.
The file belongs on a local file system (SQLite's locks do not hold over NFS).

Only the standard library, attrs and ``_events`` are imported: the client opens the spool as it
starts, and a spool on disk must never cost an import of httpx or anyio.

Exceptions::

    SpoolError       the spool failed (disk full, I/O error, closed)
     └── SpoolBusy   the file is locked by another connection: try again later
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
import typing
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO

import attrs

from . import _events as ev

logger = logging.getLogger("whisperr")

SCHEMA_VERSION = 1
APPLICATION_ID = 0x57535031  # "WSP1" in PRAGMA application_id: this file is a whisperr spool
BUSY_TIMEOUT = 0.2  # seconds a call waits for another connection's lock before SpoolBusy
OPEN_BUSY_TIMEOUT = 1.0  # at open, once: the first WAL switch and schema need the write lock
# What a row costs on disk beyond its text and blobs (the row's header, id, stamp, size and owner,
# and its entries in three indexes), so that max_bytes bounds about what the file holds.
ROW_OVERHEAD = 128
CHUNK = 500  # ids per statement: under SQLITE_MAX_VARIABLE_NUMBER (999 before SQLite 3.32)
EXPIRY_MARGIN = 60.0  # as take_batch: a row this close to the 30-day edge would be refused
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_CORRUPT_WORDS = ("malformed", "not a database", "corrupt")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        occurred_at REAL NOT NULL,
        message_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        event_type TEXT,
        payload BLOB NOT NULL,
        context BLOB,
        size INTEGER NOT NULL,
        owner TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_age ON events (occurred_at)",
    "CREATE INDEX IF NOT EXISTS events_message ON events (message_id)",
    "CREATE INDEX IF NOT EXISTS events_owner ON events (owner) WHERE owner IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS owners (
        token TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, heartbeat REAL NOT NULL
    )""",
    # Running totals kept by triggers: bounding the file never sums a column over every row.
    """CREATE TABLE IF NOT EXISTS totals (
        one INTEGER PRIMARY KEY CHECK (one = 1), events INTEGER NOT NULL, bytes INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO totals VALUES (1, 0, 0)",
    """CREATE TRIGGER IF NOT EXISTS events_in AFTER INSERT ON events BEGIN
        UPDATE totals SET events = events + 1, bytes = bytes + new.size; END""",
    """CREATE TRIGGER IF NOT EXISTS events_out AFTER DELETE ON events BEGIN
        UPDATE totals SET events = events - 1, bytes = bytes - old.size; END""",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_FIELDS = "user_id, event_type, occurred_at, payload, message_id, context"
# The items themselves are the parameters, in their order (user_id, event_type, occurred_at,
# payload, message_id[, context]): sqlite3 binds them in C, with no Python per row, so the
# spool's thread holds the GIL (which the caller's track() needs) as little as it can. The size
# is computed by SQLite from the same values.
_INSERT = (
    "INSERT INTO events (user_id, event_type, occurred_at, payload, message_id, context, size,"
    " owner) SELECT u, t, o, p, m, c, length(u) + coalesce(length(t), 0) + length(p)"
    " + length(m) + coalesce(length(c), 0) + " + str(ROW_OVERHEAD) + ", {owner}"
    " FROM (SELECT ? AS u, ? AS t, ? AS o, ? AS p, ? AS m, {context} AS c)"
)
_INSERT_PLAIN = _INSERT.replace("{context}", "NULL")
_INSERT_CONTEXT = _INSERT.replace("{context}", "?")
_OLDEST_FIRST = "ORDER BY occurred_at, id"
# A forked child's copies of its parent's connections: never used, and never garbage-collected
# (which would close them: sqlite3_close on a connection a parent still uses).
_abandoned: list[sqlite3.Connection] = []
# Every open spool of this process. A fork waits for each one's transaction to end: SQLite keeps
# the locks a process holds in its memory, which a child inherits, so a child forked in the
# middle of a transaction would find the file locked by its parent's copy for ever.
_open: weakref.WeakSet[Spool] = weakref.WeakSet()


_held_over_fork: list[Spool] = []


def _before_fork() -> None:
    for spool in list(_open):
        spool._lock.acquire()
        _held_over_fork.append(spool)


def _after_fork_in_parent() -> None:
    while _held_over_fork:
        _held_over_fork.pop()._lock.release()


def _after_fork_in_child() -> None:
    while _held_over_fork:  # the parent's thread that would release these is not here
        _held_over_fork.pop()._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class SpoolError(Exception):
    """The spool could not do what was asked (disk full, I/O error, a closed spool)."""


class SpoolBusy(SpoolError):
    """Another connection holds the file's lock: nothing was done; try again later."""


@attrs.frozen
class Claim:
    """What :meth:`Spool.claim` took.

    Attributes:
        items: rows now this owner's, oldest ``occurred_at`` first, to deliver.
        expired: rows past the API's 30-day window, deleted: the caller reports them dropped.
    """

    items: list[ev.Item]
    expired: list[ev.Item]


@attrs.frozen
class Added:
    """What :meth:`Spool.add` did.

    Attributes:
        stored: rows written.
        evicted: the oldest rows deleted to keep within ``max_bytes`` that no live process holds
            (free rows, a dead owner's; possibly some just offered with ``owned=False``): lost,
            the caller reports them dropped.
        held: rows deleted for the bound as well, but held by a live owner (its write-ahead
            copies or rows it claimed): still in that process's memory, so not lost, only no
            longer on disk.
    """

    stored: int
    evicted: list[ev.Item]
    held: int = 0


@attrs.frozen
class SpoolInfo:
    """A spool's contents at a glance, for the command line and stats."""

    events: int
    bytes: int
    oldest: float | None
    newest: float | None
    claimed: int  # rows an owner holds (a dead owner's too, until they are claimed again)
    owners: int  # the owners alive
    path: str


class _Unusable(Exception):
    """The file cannot be a spool (unwritable, newer, another application's): left as it is."""


class _Corrupt(Exception):
    """The file is not a readable SQLite database: it is moved aside."""


@typing.final
class Spool:
    """A spool file and this process's connection to it, guarded by a lock (any thread).

    Made by :meth:`open`. Each object is one owner, named by a random token.
    """

    def __init__(
        self,
        path: str,
        connection: sqlite3.Connection,
        *,
        max_bytes: int,
        claim_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._db = connection
        self._max_bytes = max_bytes
        self._claim_timeout = claim_timeout
        self._clock = clock
        self._host = socket.gethostname()
        self._become_new_owner()
        _open.add(self)

    def _become_new_owner(self) -> None:
        self._lock = threading.Lock()
        self._token = secrets.token_hex(8)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Spool {self.path} owner={self._token}>"

    @classmethod
    def open(
        cls,
        path: str,
        *,
        max_bytes: int,
        claim_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> Spool | None:
        """Open the spool at ``path``, creating it (mode 0600); None if it cannot be used.

        A file that is not a readable SQLite database is moved aside to
        ``{path}.corrupt-{time}`` and a fresh one made. A file this version cannot use (a newer
        schema, another application's database, an unwritable place) is left as it is. Either
        is logged at ERROR; with None the client keeps events in memory only.
        """
        try:
            connection = _open_or_replace(path, clock)
        except _Unusable as exc:
            logger.error(
                "whisperr: the spool %s cannot be used (%s); events stay in memory", path, exc
            )
            return None
        return cls(path, connection, max_bytes=max_bytes, claim_timeout=claim_timeout, clock=clock)

    def add(self, items: Sequence[ev.Item], *, owned: bool) -> Added:
        """Write ``items`` in one transaction, then delete the oldest rows beyond ``max_bytes``.

        Args:
            items: the messages to keep.
            owned: True for this owner's write-ahead copies (no other process claims them while
                it lives), False for rows free for any process to claim.
        """
        if not items:
            return Added(0, [])
        owner = f"'{self._token}'" if owned else "NULL"  # hex digits: a safe SQL literal
        plain = [item for item in items if len(item) == 5]
        with self._write() as db:
            if owned:
                self._beat(db)
            db.executemany(_INSERT_PLAIN.format(owner=owner), plain)
            if len(plain) < len(items):
                with_context = [item for item in items if len(item) != 5]
                db.executemany(_INSERT_CONTEXT.format(owner=owner), with_context)
            evicted, held = self._bound(db)
        return Added(len(items), evicted, held)

    def _bound(self, db: sqlite3.Connection) -> tuple[list[ev.Item], int]:
        """Delete the oldest rows while the stored sizes exceed ``max_bytes``."""
        (total,) = db.execute("SELECT bytes FROM totals").fetchone()
        excess = total - self._max_bytes
        if excess <= 0:
            return [], 0
        live = self._live(db)
        ids, lost, held, freed = [], [], 0, 0
        rows = db.execute(f"SELECT id, size, owner, {_FIELDS} FROM events {_OLDEST_FIRST}")
        for rowid, size, owner, *fields in rows:
            ids.append(rowid)
            if owner in live:
                held += 1
            else:
                lost.append(_item(fields))
            freed += size
            if freed >= excess:
                break
        rows.close()
        _delete(db, ids)
        return lost, held

    def claim(self, limit: int) -> Claim:
        """Take up to ``limit`` free rows, or a dead owner's, oldest first, for this owner.

        Claimable rows past the API's window are deleted and returned apart. Rows this owner
        holds already (its write-ahead copies, rows claimed before) are never returned.
        """
        if limit <= 0:
            return Claim([], [])
        with self._write() as db:
            self._beat(db)
            live = sorted(self._live(db))
            free = f"(owner IS NULL OR owner NOT IN ({_marks(len(live))}))"
            cutoff = self._clock() - ev.MAX_PAST + EXPIRY_MARGIN
            expired = db.execute(
                f"SELECT id, {_FIELDS} FROM events WHERE occurred_at < ? AND {free}",
                (cutoff, *live),
            ).fetchall()
            _delete(db, [row[0] for row in expired])
            taken = db.execute(
                f"SELECT id, {_FIELDS} FROM events WHERE {free} {_OLDEST_FIRST} LIMIT ?",
                (*live, limit),
            ).fetchall()
            for chunk in _chunks([row[0] for row in taken]):
                db.execute(
                    f"UPDATE events SET owner = ? WHERE id IN ({_marks(len(chunk))})",
                    (self._token, *chunk),
                )
            db.execute(f"DELETE FROM owners WHERE token NOT IN ({_marks(len(live))})", live)
        return Claim([_item(row[1:]) for row in taken], [_item(row[1:]) for row in expired])

    def remove(self, message_ids: Iterable[str]) -> int:
        """Delete the rows with these message ids (delivered, or dropped for good); how many.

        An empty id is skipped: every identify's id is empty, so it names no row of its own.
        """
        ids = [message_id for message_id in dict.fromkeys(message_ids) if message_id]
        if not ids:
            return 0
        with self._write() as db:
            return sum(
                db.execute(
                    f"DELETE FROM events WHERE message_id IN ({_marks(len(chunk))})", chunk
                ).rowcount
                for chunk in _chunks(ids)
            )

    def heartbeat(self) -> None:
        """Tell other processes this owner lives (``add(owned=True)`` and ``claim`` do too)."""
        with self._write() as db:
            self._beat(db)

    def held_ids(self) -> set[str]:
        """The message ids of the rows this owner holds (its journal, what it claimed): at
        close, what it holds in memory but the file lost (evicted by the bound) is told apart."""
        with self._read() as db:
            found = db.execute("SELECT message_id FROM events WHERE owner = ?", (self._token,))
            return {message_id for (message_id,) in found}

    def release(self) -> None:
        """At a clean close: this owner's rows become free (not delivered yet), its entry goes."""
        with self._write() as db:
            db.execute("UPDATE events SET owner = NULL WHERE owner = ?", (self._token,))
            db.execute("DELETE FROM owners WHERE token = ?", (self._token,))

    def info(self) -> SpoolInfo:
        """The counts, one consistent snapshot."""
        with self._read() as db:
            events, size = db.execute("SELECT events, bytes FROM totals").fetchone()
            # min() and max() in one query would scan: apart, each reads one end of the index
            (oldest,) = db.execute("SELECT min(occurred_at) FROM events").fetchone()
            (newest,) = db.execute("SELECT max(occurred_at) FROM events").fetchone()
            (claimed,) = db.execute(
                "SELECT count(*) FROM events WHERE owner IS NOT NULL"
            ).fetchone()
            owners = len(self._alive(db))
        return SpoolInfo(events, size, oldest, newest, claimed, owners, self.path)

    def export(self, out: IO[bytes]) -> int:
        """Write every row to ``out`` as a JSON line, oldest first; how many."""
        import json  # the command line's need only: not on the client's start path

        count = 0
        with self._read() as db:
            for row in db.execute(f"SELECT {_FIELDS} FROM events {_OLDEST_FIRST}"):
                out.write(_export_line(row, json.dumps))
                count += 1
        return count

    def purge(self) -> int:
        """Delete every row; how many."""
        with self._write() as db:
            return db.execute("DELETE FROM events").rowcount

    def close(self) -> None:
        """Close the connection (idempotent); this owner's rows stay its own until it is dead
        (see :meth:`release`)."""
        with self._lock:
            self._db.close()
        _open.discard(self)

    def after_fork(self) -> None:
        """In a forked child: a new connection and a new owner; the parent's rows stay its own.

        The parent's connection is never touched here, not even closed.

        Raises:
            SpoolError: the file could not be opened again.
        """
        _abandoned.append(self._db)
        self._become_new_owner()
        try:
            self._db = _connect(self.path)
        except (_Unusable, _Corrupt) as exc:
            self._db = _closed_connection()  # every later call raises SpoolError
            raise SpoolError(f"the spool {self.path} could not be opened again: {exc}") from None

    def _connection(self) -> sqlite3.Connection:
        """The connection, a new one first in a forked child that did not call after_fork."""
        if self._pid != os.getpid():
            self.after_fork()
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken at once (``BEGIN IMMEDIATE``): no other writer meanwhile."""
        db = self._connection()
        with self._lock, _translated(), _transaction(db, "BEGIN IMMEDIATE"):
            yield db

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one snapshot of the file, which writers do not block (WAL)."""
        db = self._connection()
        with self._lock, _translated(), _transaction(db, "BEGIN"):
            yield db

    def _beat(self, db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT OR REPLACE INTO owners VALUES (?, ?, ?, ?)",
            (self._token, self._pid, self._host, self._clock()),
        )

    def _live(self, db: sqlite3.Connection) -> set[str]:
        """The owners alive now, this one included."""
        return self._alive(db) | {self._token}

    def _alive(self, db: sqlite3.Connection) -> set[str]:
        """The owners in the file alive now: a fresh heartbeat, and a process that exists if it
        is on this host."""
        stale = self._clock() - self._claim_timeout
        return {
            token
            for token, pid, host, beat in db.execute(
                "SELECT token, pid, host, heartbeat FROM owners"
            )
            if beat >= stale and (host != self._host or _process_exists(pid))
        }


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts)."""
    if pid <= 0 or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's
        return True
    return True


def _item(fields: Sequence[typing.Any]) -> ev.Item:
    user_id, event_type, stamp, payload, message_id, context = fields
    if context is None:
        return (user_id, event_type, stamp, payload, message_id)
    return (user_id, event_type, stamp, payload, message_id, context)


def _export_line(row: Sequence[typing.Any], dumps: Callable[[object], str]) -> bytes:
    """One row as JSON: the stored JSON (properties, an identify's body, context) as it is."""
    user_id, event_type, stamp, payload, message_id, context = row
    return b'{"external_user_id":%b,"event_type":%b,"occurred_at":"%b","message_id":%b,' % (
        dumps(user_id).encode(),
        dumps(event_type).encode(),
        ev.format_timestamp(stamp).encode(),
        dumps(message_id).encode(),
    ) + b'"%b":%b,"context":%b}\n' % (
        b"body" if event_type is None else b"properties",
        payload,
        b"null" if context is None else context,
    )


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _chunks(values: list[typing.Any]) -> Iterator[list[typing.Any]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def _delete(db: sqlite3.Connection, ids: list[int]) -> None:
    for chunk in _chunks(ids):
        db.execute(f"DELETE FROM events WHERE id IN ({_marks(len(chunk))})", chunk)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str) -> Iterator[None]:
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite rolls some failures (a full disk) back itself
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                db.execute("ROLLBACK")
        raise


def _closed_connection() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.close()
    return db


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """SQLite's exceptions as the spool's."""
    try:
        yield
    except sqlite3.Error as exc:
        if _is_busy(exc):
            raise SpoolBusy(f"the spool is locked by another connection ({exc})") from exc
        raise SpoolError(f"the spool failed: {exc}") from exc


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    return any(word in str(exc) for word in _CORRUPT_WORDS)


def _open_or_replace(path: str, clock: Callable[[], float]) -> sqlite3.Connection:
    """A connection to the spool at ``path``; a corrupt file is moved aside for a fresh one.

    Raises:
        _Unusable: the file cannot be used, or no fresh one could be made.
    """
    try:
        return _connect(path)
    except _Corrupt as exc:
        try:
            aside = _move_aside(path, clock)
        except OSError as error:
            raise _Unusable(f"{exc}; it could not be moved aside: {error}") from None
        logger.error(
            "whisperr: the spool %s could not be read (%s); moved it aside to %s, starting afresh",
            path,
            exc,
            aside,
        )
    try:
        return _connect(path)
    except _Corrupt as exc:
        raise _Unusable(f"a fresh spool could not be made: {exc}") from None


def _connect(path: str) -> sqlite3.Connection:
    """Create the file if need be, connect, check it and its schema (made if new).

    Raises:
        _Corrupt: it is not a readable SQLite database.
        _Unusable: it cannot be made, opened or written, or is not a spool this version knows.
    """
    _create(path)
    try:
        db = sqlite3.connect(
            path, timeout=OPEN_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise _Unusable(str(exc)) from None
    try:
        _prepare(db)
    except sqlite3.Error as exc:
        db.close()
        raise (_Corrupt if _is_corrupt(exc) else _Unusable)(str(exc)) from None
    except BaseException:
        db.close()
        raise
    return db


def _create(path: str) -> None:
    """Create an empty file readable by its owner alone, whatever the umask."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise _Unusable(f"it could not be created: {exc}") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _prepare(db: sqlite3.Connection) -> None:
    """WAL, the integrity check, the schema (created in a new file); then the short busy wait."""
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise _Corrupt("; ".join(map(str, problems)))
    if _schema_needed(db):  # checked again under the write lock: another may be making it
        with _transaction(db, "BEGIN IMMEDIATE"):
            if _schema_needed(db):
                for statement in _SCHEMA:
                    db.execute(statement)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")


def _schema_needed(db: sqlite3.Connection) -> bool:
    """Whether the file is new (the schema is to be made); raise if it is not ours to use."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    (application,) = db.execute("PRAGMA application_id").fetchone()
    if version > SCHEMA_VERSION:
        raise _Unusable(
            f"its schema version {version} is newer than this whisperr's; left as it is"
        )
    if application == APPLICATION_ID:
        return bool(version < SCHEMA_VERSION)
    (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    if application or tables:
        raise _Unusable("it is another application's SQLite database; left as it is")
    return True


def _move_aside(path: str, clock: Callable[[], float]) -> str:
    """Rename the file (with its -wal, -shm, -journal) to a name not taken yet; that name."""
    aside = base = f"{path}.corrupt-{int(clock())}"
    taken = 0
    while os.path.lexists(aside):
        taken += 1
        aside = f"{base}.{taken}"
    os.replace(path, aside)
    for suffix in ("-wal", "-shm", "-journal"):
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside
