"""The spool's command line: ``python -m whisperr.spool PATH`` shows what a spool file holds.

``--export`` writes its rows as JSON lines, ``--purge`` empties it, ``--replay`` delivers it now
(with the ``WHISPERR_*`` settings of the environment). Nothing here prints the API key.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Sequence
from typing import IO

from ._events import format_timestamp
from ._spool import Spool, SpoolError, SpoolInfo

NO_BOUND = 1 << 62  # the command line never adds, so it never evicts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status (0 done, 1 failed or not all delivered)."""
    args = _parser().parse_args(argv)
    if not os.path.exists(args.path):
        print(f"{args.path}: no such spool file (it does not exist)", file=sys.stderr)
        return 1
    if args.replay:
        return _replay(args.path, args.timeout)
    spool = Spool.open(args.path, max_bytes=NO_BOUND)
    if spool is None:
        print(f"{args.path}: the spool cannot be opened (see the error above)", file=sys.stderr)
        return 1
    try:
        if args.export:
            _export(spool, args.out)
        elif args.purge:
            print(f"purged {spool.purge()} events")
        else:
            print(_describe(spool.info(), time.time()))
    except (SpoolError, OSError) as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        spool.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisperr.spool",
        description="Show, export, purge or replay a whisperr spool file.",
    )
    parser.add_argument("path", metavar="PATH", help="the spool file")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--export", action="store_true", help="write every event as JSON lines")
    action.add_argument("--purge", action="store_true", help="delete every event (asks nothing)")
    action.add_argument("--replay", action="store_true", help="deliver the spooled events now")
    parser.add_argument("--out", metavar="FILE", help="with --export: write to FILE (mode 0600)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="with --replay: seconds to wait (30)"
    )
    return parser


def _export(spool: Spool, out: str | None) -> None:
    if out is None:
        spool.export(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    # The events are the caller's users' data: the file is readable by its owner alone.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        count = spool.export(file)
    print(f"exported {count} events to {out}", file=sys.stderr)


def _describe(info: SpoolInfo, now: float) -> str:
    return "\n".join(
        [
            f"path: {info.path}",
            f"events: {info.events}",
            f"bytes: {info.bytes}",
            f"oldest: {_moment(info.oldest, now)}",
            f"newest: {_moment(info.newest, now)}",
            f"claimed: {info.claimed}",
            f"owners: {info.owners}",
        ]
    )


def _moment(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    return f"{format_timestamp(stamp)} ({_age(now - stamp)} ago)"


def _age(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``3m 20s``, ``2h 0m``, ``4d 3h``."""
    whole = max(int(seconds), 0)
    units = [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)]
    for (name, size), (next_name, next_size) in itertools.pairwise(units):
        if whole >= size:
            return f"{whole // size}{name} {whole % size // next_size}{next_name}"
    return f"{whole}s"


def _replay(path: str, timeout: float) -> int:
    """Deliver the spool with a client of the environment's settings, and say what happened."""
    import whisperr

    try:
        client = whisperr.Client(spool_path=path)
    except whisperr.WhisperrError as exc:  # its messages never hold the key
        print(f"cannot replay: {exc}", file=sys.stderr)
        return 1
    try:
        flushed = client.flush(timeout=timeout)
    finally:
        closed = client.close(timeout=timeout)
    stats = client.stats()  # after close: what the close delivered counts too
    _print_fields(sys.stdout, stats, ("replayed", "delivered", "dropped"))
    settled = not flushed.timed_out and not closed.timed_out
    return 0 if settled and stats.dropped == 0 else 1


def _print_fields(out: IO[str], record: object, names: Sequence[str]) -> None:
    for name in names:
        print(f"{name}: {getattr(record, name, '-')}", file=out)


if __name__ == "__main__":
    sys.exit(main())
