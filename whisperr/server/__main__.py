"""Run the local Whisperr ingestion server in the foreground: `python -m whisperr.server --help`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from whisperr.server._app import RECEIPT_SHAPES, WhisperrApp, create_app
from whisperr.server._faults import Faults, parse_mix
from whisperr.server._http import DEFAULT_HOST, serve

DEFAULT_PORT = 8787
# The exit statuses, as the epilog of --help documents them.
EXIT_STOPPED = 0  # SIGTERM
EXIT_UNAVAILABLE = 2  # the address cannot be bound; argparse also exits 2 on a usage error
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report a process ended by it

_PROG = "python -m whisperr.server"
_PREFIX = "whisperr.server"
_DESCRIPTION = """\
A local Whisperr-compatible ingestion server, for development, tests, demos and
benchmarks; not for production. It answers POST /v1/events/batch, /v1/events/track
and /v1/identify with the API's validation, error envelope and deduplication on
$message_id, prints each request it receives, and keeps what it stored in memory:
GET /_local/events returns it, POST /_local/reset forgets it."""
_EPILOG = f"""\
examples:
  {_PROG} --port 8787 --api-key wrk_local
  WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787 python your_app.py
  {_PROG} --port 0 --fault-mix "503=0.2,429:1=0.1,close=0.1" --seed 7

faults (to rehearse outages) apply to /v1/* requests, never to /_local/*:
  --latency S    delays every answer by S seconds
  --fault-mix M  picks a fault at random for each request, M being FAULT=PROBABILITY
                 items (probabilities summing to at most 1) where FAULT is a status
                 code (503), a status with a Retry-After (429:2), close (hang up,
                 store nothing), lost_ack (store, then hang up), hang (never answer)
                 or delay:S (answer normally after S seconds); --seed repeats a run
  An exact sequence of faults is scripted from Python instead:
    with LocalServer(create_app()) as server:
        server.app.faults.script([Fault.status(503), Fault.lost_ack(), None])
  (from whisperr.server; see help(whisperr.server.Faults)).

exit status: 0 when stopped by SIGTERM, 130 by Ctrl-C (SIGINT), 2 on a
usage error or when the address cannot be bound (port in use, permission
denied, an address not of this machine), with one line on stderr saying why."""

_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}
_DENIED = {errno.EACCES, errno.EPERM, getattr(errno, "WSAEACCES", errno.EACCES)}
_NOT_LOCAL = {errno.EADDRNOTAVAIL, getattr(errno, "WSAEADDRNOTAVAIL", errno.EADDRNOTAVAIL)}


class _BindError(Exception):
    """The server could not start listening; the message is the one line to print."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve until Ctrl-C or SIGTERM.

    Returns:
        The exit status: 0 after SIGTERM, 130 after Ctrl-C, 2 when the address cannot be
        bound (a usage error exits 2 too, through `SystemExit`).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        faults = _faults(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.quiet:
        _echo_to_stdout()
    app = create_app(
        api_key=args.api_key,
        faults=faults,
        echo=not args.quiet,
        validate=not args.no_validate,
        receipt=args.receipt,
    )
    try:
        return asyncio.run(_serve(app, args.host, args.port))
    except _BindError as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:  # before the loop's handler is installed, or no such handlers
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="the address to listen on; any but a loopback one is reachable from other "
        "machines (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="the TCP port; 0 picks a free one, and the line printed at start names it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="require this key, as X-API-Key or Authorization: Bearer (default: none: without "
        "--api-key any key is accepted, and so is a request without one)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not print each request (default: print them to stdout)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before every answer to /v1/* (default: %(default)s)",
    )
    parser.add_argument(
        "--fault-mix",
        default="",
        metavar="MIX",
        help='random faults per request, e.g. "503=0.2,429:1=0.1,close=0.1" (see below; '
        "default: none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed the --fault-mix draws, to repeat a run (default: none, a new sequence each run)",
    )
    parser.add_argument(
        "--receipt",
        choices=RECEIPT_SHAPES,
        default="event",
        help="the shape of the answer to POST /v1/events/track (default: %(default)s)",
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="benchmarks: skip the field checks of batches, keep only $message_id "
        "(deduplicated) (default: validate like the API)",
    )
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def _faults(args: argparse.Namespace) -> Faults:
    if args.latency < 0:
        raise ValueError("--latency cannot be negative")
    faults = Faults(latency=args.latency)
    faults.mix(parse_mix(args.fault_mix), seed=args.seed)
    return faults


def _echo_to_stdout() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("whisperr.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _serve(app: WhisperrApp, host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status for the signal received."""
    stop = asyncio.Event()
    status = EXIT_STOPPED
    listening = False

    def on_signal(signum: int) -> None:
        nonlocal status
        status = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_STOPPED
        stop.set()

    def on_ready(url: str) -> None:
        nonlocal listening
        listening = True
        if not _is_loopback(host):
            print(f"warning: listening on {host}, reachable from other hosts", file=sys.stderr)
        _announce(url)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(signum, on_signal, signum)
    try:
        await serve(app, stop=stop, host=host, port=port, on_ready=on_ready)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode
        if listening:
            raise
        raise _BindError(_bind_failure(host, port, exc)) from exc
    return status


def _bind_failure(host: str, port: int, exc: OSError | UnicodeError) -> str:
    """One line saying why the server cannot listen on host:port."""
    where = f"{host} port {port}"
    if isinstance(exc, UnicodeError):
        return f"cannot listen on {where}: {host!r} is not a valid host name"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: {exc.strerror or exc}"
    code = exc.errno
    if code in _IN_USE:
        return f"port {port} on {host} is in use (try --port 0 for a free one)"
    # asyncio rewrites the message ("error while attempting to bind on ..."); errno survives.
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    if code in _DENIED:
        hint = "ports below 1024 usually need privileges; try --port 0 for a free one"
    elif code in _NOT_LOCAL:
        hint = f"it is not an address of this machine; try --host {DEFAULT_HOST}"
    else:
        hint = ""
    return f"cannot listen on {where}: {reason}" + (f" ({hint})" if hint else "")


def _announce(url: str) -> None:
    print(f"Whisperr local server listening on {url}  (Ctrl-C to stop)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
