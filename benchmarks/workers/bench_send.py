"""Worker for benchmarks/send.py: one event delivered now and waited for, one variant a process.

The spec holds ``variant`` (below), ``url`` (the server's base URL), ``key`` (its API key),
``n`` (timed sequential sends), ``warmup`` (sequential sends before them), ``senders`` and
``per_sender`` (the concurrent part: that many tasks or threads, each sending ``per_sender``
in a loop, after each has sent ``warmup_per_sender``) and ``budget`` (seconds the concurrent
part may take before it is reported as not finished). Variants:

- ``ours``: ``await whisperr.AsyncClient.send(...)``, the senders are asyncio tasks;
- ``ours-sync``: ``whisperr.Client.send(...)`` (blocks), the senders are threads;
- ``posthog-async``: ``await posthog.AsyncPosthog.capture_immediate(...)``, tasks;
- ``posthog-sync``: ``posthog.Posthog(sync_mode=True).capture(...)`` (blocks), threads;
- ``ours-post``: the request alone, as the runner makes it for a send (``post()`` over the
  pool of ``Delivery.open()``: httpx's client and our transport), without ``send()``'s
  validation, hand-off to the runner and receipt; tasks;
- ``http.client``: the standard library's keep-alive ``HTTPConnection`` POSTing an equivalent
  event to ``/v1/events/track`` (one connection a thread), the floor: what the server and the
  loopback round trip cost.

posthog POSTs ``{host}/batch/``, so its ``host`` is ``<server>/_lenient``. Only the variant's
own package is imported, so the posthog variants also run in a venv without whisperr. It prints
one ``RESULT`` line: the sequential latencies (median, p99, max, in µs), their process CPU per
send (``time.process_time``, every thread of the worker, not the server), and the concurrent
sends per second and CPU per send; ``failed`` counts the sends that raised or returned no id,
``retried`` those of ours whose receipt says more than one attempt.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import _common

EVENT_TYPE, USERS = _common.EVENT_TYPE, _common.USERS


class Tally:
    """Failed sends, from any thread, the first failure's text, and (ours) the sends that
    needed more than one attempt."""

    def __init__(self) -> None:
        self.failed = self.retried = 0
        self.first: str | None = None
        self._lock = threading.Lock()

    def fail(self, why: str) -> None:
        with self._lock:
            self.failed += 1
            self.first = self.first or why

    def retry(self) -> None:
        with self._lock:
            self.retried += 1


def latencies(ns: list[int], cpu_s: float) -> dict[str, Any]:
    us = [x / 1000 for x in ns]
    return {
        "lat_median_us": statistics.median(us),
        "lat_p99_us": statistics.quantiles(us, n=100)[98],
        "lat_max_us": max(us),
        "seq_cpu_us": cpu_s / len(us) * 1e6,
    }


def throughput(sends: int, wall_s: float, cpu_s: float) -> dict[str, Any]:
    return {"rps": sends / wall_s, "conc_wall_s": wall_s, "conc_cpu_us": cpu_s / sends * 1e6}


# -- the two shapes: coroutines with tasks, blocking calls with threads ------------------------


async def run_async(s: dict[str, Any], send: Callable[[int], Awaitable[None]]) -> dict[str, Any]:
    for i in range(s["warmup"]):
        await send(i)
    ns: list[int] = []
    cpu = time.process_time()
    for i in range(s["n"]):
        t0 = time.perf_counter_ns()
        await send(i)
        ns.append(time.perf_counter_ns() - t0)
    out = latencies(ns, time.process_time() - cpu)

    async def sender(k: int, count: int) -> None:
        for j in range(count):
            await send(k * count + j)

    senders, per = s["senders"], s["per_sender"]
    await asyncio.gather(*(sender(k, s["warmup_per_sender"]) for k in range(senders)))
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(sender(k, per) for k in range(senders))), s["budget"]
        )
    except asyncio.TimeoutError:
        return {**out, "error": f"{senders} x {per} sends did not finish in {s['budget']} s"}
    out.update(throughput(senders * per, time.perf_counter() - wall, time.process_time() - cpu))
    return out


def run_threads(s: dict[str, Any], send: Callable[[int], None]) -> dict[str, Any]:
    for i in range(s["warmup"]):
        send(i)
    ns: list[int] = []
    cpu = time.process_time()
    for i in range(s["n"]):
        t0 = time.perf_counter_ns()
        send(i)
        ns.append(time.perf_counter_ns() - t0)
    out = latencies(ns, time.process_time() - cpu)

    senders, per = s["senders"], s["per_sender"]
    start = threading.Barrier(senders + 1)

    def sender(k: int) -> None:
        for j in range(s["warmup_per_sender"]):  # connections opened before the timing
            send(k * per + j)
        start.wait()
        for j in range(per):
            send(k * per + j)

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for thread in threads:
        thread.start()
    start.wait(timeout=s["budget"])
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = wall + s["budget"]
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    if any(thread.is_alive() for thread in threads):
        return {**out, "error": f"{senders} x {per} sends did not finish in {s['budget']} s"}
    out.update(throughput(senders * per, time.perf_counter() - wall, time.process_time() - cpu))
    return out


# -- the variants -----------------------------------------------------------------------------


def ours(s: dict[str, Any], tally: Tally, blocking: bool) -> dict[str, Any]:
    import whisperr

    def checked(receipt: whisperr.Receipt) -> None:
        if not (receipt.sent and receipt.status == 202):
            tally.fail(f"receipt {receipt!r}")
        elif receipt.attempts != 1:
            tally.retry()

    settings = {"api_key": s["key"], "base_url": s["url"]}
    if blocking:
        with whisperr.Client(**settings) as client:

            def send_blocking(i: int) -> None:
                try:
                    checked(client.send(USERS[i % 1000], EVENT_TYPE, _common.fresh_props(i)))
                except whisperr.SendError as error:
                    tally.fail(repr(error))

            out = run_threads(s, send_blocking)
            out["stats"] = repr(client.stats())
    else:

        async def main() -> dict[str, Any]:
            async with whisperr.AsyncClient(**settings) as client:

                async def send(i: int) -> None:
                    try:
                        receipt = await client.send(
                            USERS[i % 1000], EVENT_TYPE, _common.fresh_props(i)
                        )
                    except whisperr.SendError as error:
                        tally.fail(repr(error))
                    else:
                        checked(receipt)

                out = await run_async(s, send)
                out["stats"] = repr(client.stats())
                return out

        out = asyncio.run(main())
    return {**out, "version": whisperr.__version__, "file": whisperr.__file__}


class Discarded(logging.Handler):
    """Counts urllib3's "Connection pool is full, discarding connection" warnings."""

    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "pool is full" in record.getMessage():
            Discarded.count += 1


def posthog(s: dict[str, Any], tally: Tally, blocking: bool) -> dict[str, Any]:
    import posthog as ph

    host = f"{s['url']}/_lenient"
    if blocking:
        pool_log = logging.getLogger("urllib3.connectionpool")
        pool_log.setLevel(logging.WARNING)
        pool_log.propagate = False
        pool_log.addHandler(Discarded())
        client = ph.Posthog("phc_bench", host=host, sync_mode=True)

        def send_blocking(i: int) -> None:
            try:
                got = client.capture(
                    EVENT_TYPE, distinct_id=USERS[i % 1000], properties=_common.fresh_props(i)
                )
            except Exception as error:  # its request errors propagate in sync_mode
                tally.fail(repr(error))
            else:
                if got is None:
                    tally.fail("capture() returned None")

        try:
            out = run_threads(s, send_blocking)
        finally:
            client.shutdown()
        out["discarded_connections"] = Discarded.count
    else:

        async def main() -> dict[str, Any]:
            client = ph.AsyncPosthog("phc_bench", host=host)

            async def send(i: int) -> None:
                got = await client.capture_immediate(
                    EVENT_TYPE, distinct_id=USERS[i % 1000], properties=_common.fresh_props(i)
                )
                if got is None:  # it logs the failure and returns None
                    tally.fail("capture_immediate() returned None")

            try:
                return await run_async(s, send)
            finally:
                await client.shutdown()

        out = asyncio.run(main())
    return {**out, "version": ph.VERSION}


def event_body(i: int) -> bytes:
    """One event as ``POST /v1/events/track`` takes it, stamped now, with a fresh id."""
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    event = {
        "external_user_id": USERS[i % 1000],
        "event_type": EVENT_TYPE,
        "occurred_at": now.replace("+00:00", "Z"),
        "properties": _common.fresh_props(i),
        "context": {"$message_id": str(uuid.uuid4())},
    }
    return json.dumps(event).encode()


def ours_post(s: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """The request alone, as the runner makes it: the pool of ``Delivery.open()`` and
    ``whisperr._transport.post()`` (private, as in bench_transport.py), without send()."""
    import httpx

    import whisperr
    from whisperr._config import Settings
    from whisperr._delivery import Delivery
    from whisperr._ledger import Ledger
    from whisperr._transport import post, request_headers

    url = httpx.URL(s["url"] + "/v1/events/track")
    headers = request_headers(s["key"])

    async def main() -> dict[str, Any]:
        delivery = Delivery(Settings(api_key=s["key"], base_url=s["url"]), Ledger(None))
        client = delivery.open()

        async def send(i: int) -> None:
            outcome = await post(client, url, headers, event_body(i), 10.0, time.time)
            if outcome.kind != "ok" or outcome.status != 202:
                tally.fail(f"{outcome.kind} {outcome.status} {outcome.message}")

        try:
            return await run_async(s, send)
        finally:
            await delivery.close(client)

    return {**asyncio.run(main()), "version": whisperr.__version__, "file": whisperr.__file__}


def stdlib(s: dict[str, Any], tally: Tally) -> dict[str, Any]:
    parts = urlsplit(s["url"])
    local = threading.local()
    headers = {"Content-Type": "application/json", "X-API-Key": s["key"]}

    def send(i: int) -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(
                parts.hostname, parts.port, timeout=10
            )
        connection.request("POST", "/v1/events/track", event_body(i), headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 202:
            tally.fail(f"{response.status} {answer[:200]!r}")

    return {**run_threads(s, send), "version": "stdlib"}


def main(s: dict[str, Any]) -> dict[str, Any]:
    tally = Tally()
    variant = s["variant"]
    if variant in ("ours", "ours-sync"):
        out = ours(s, tally, blocking=variant == "ours-sync")
    elif variant in ("posthog-async", "posthog-sync"):
        out = posthog(s, tally, blocking=variant == "posthog-sync")
    elif variant == "ours-post":
        out = ours_post(s, tally)
    elif variant == "http.client":
        out = stdlib(s, tally)
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    out.update(failed=tally.failed, first_failure=tally.first, retried=tally.retried)
    return {**out, "variant": variant}


if __name__ == "__main__":
    _common.quiet_loggers("whisperr", "httpx", "posthog", "urllib3")
    _common.finish(main(_common.spec()))
