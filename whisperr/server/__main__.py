"""Run the local Whisperr ingestion server in the foreground: `python -m whisperr.server --help`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence

from whisperr.server._app import RECEIPT_SHAPES, WhisperrApp, create_app
from whisperr.server._faults import Faults, parse_mix
from whisperr.server._http import DEFAULT_HOST, serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve until Ctrl-C or SIGTERM."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        faults = _faults(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.quiet:
        _echo_to_stdout()
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}, reachable from other hosts", file=sys.stderr)
    app = create_app(
        api_key=args.api_key,
        faults=faults,
        echo=not args.quiet,
        validate=not args.no_validate,
        receipt=args.receipt,
    )
    with contextlib.suppress(KeyboardInterrupt):  # platforms without loop signal handlers
        asyncio.run(_serve(app, args.host, args.port))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whisperr.server", description="A local Whisperr ingestion server."
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--api-key", help="require this key (X-API-Key or Bearer)")
    parser.add_argument("--quiet", action="store_true", help="do not print each request")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--fault-mix", default="", help='e.g. "503=0.2,429:1=0.1,close=0.1"')
    parser.add_argument("--seed", type=int, help="seed for --fault-mix")
    parser.add_argument(
        "--receipt",
        choices=RECEIPT_SHAPES,
        default="event",
        help="the shape of the answer to POST /v1/events/track (default %(default)s)",
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="benchmarks: skip the field checks of batches, keep only $message_id (deduplicated)",
    )
    return parser


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


async def _serve(app: WhisperrApp, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(signum, stop.set)
    await serve(app, stop=stop, host=host, port=port, on_ready=_announce)


def _announce(url: str) -> None:
    print(f"Whisperr local server listening on {url}  (Ctrl-C to stop)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
