"""Python load generators for ``benchmarks/service.py``; standard library only.

    python loadgen.py '<json spec>'     # prints one line: RESULT {json}

``spec["mode"]`` is one of:

- ``fixed``: an open-loop client at ``rate`` requests a second for ``warmup + duration``
  seconds, over ``connections`` keep-alive HTTP/1.1 connections, one thread each. Request ``i``
  is scheduled at ``start + i / rate`` and belongs to connection ``i % connections`` (as wrk2
  spreads its schedule). A connection that is behind sends its late requests at once, and every
  latency is measured **from the scheduled time** to the end of the answer, so a server that
  stalls is charged for the requests it held up (no coordinated omission). The time from the
  actual send is reported too (``service_ms``), with the lag between the two (``send_lag_ms``:
  queueing behind a slow answer, or this generator running late) and, for requests whose
  connection was idle, how late this generator woke up to send them (``idle_wake_lag_ms``: its
  own delay alone). Only requests scheduled after ``warmup`` count. With ``cpu_pid`` it reads
  that process's CPU time (user + system, every thread, from ``/proc/<pid>/stat``) at the start
  and the end of the measured window and divides it by the answers received in it; with
  ``service_cpu`` also the share of that CPU other processes took meanwhile (``/proc/stat``).
- ``closed``: ``connections`` asyncio connections each sending its next request as soon as the
  answer to the last one arrived, for ``duration`` seconds: the saturated throughput, when wrk
  is not installed.

Every request is ``POST {path}`` with an empty body to 127.0.0.1; every socket has a timeout and
the run a deadline, so it always ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any

_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")
GRACE_S = 10.0  # after the schedule ends, how long late answers are still waited for


def request_bytes(host: str, port: int, path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n".encode()


def head_info(head: bytes) -> tuple[int, int]:
    """The status and Content-Length of an answer's head (without its blank line)."""
    match = _CONTENT_LENGTH.search(head)
    if match is None:
        raise ValueError("an answer without Content-Length (chunked answers are not supported)")
    return int(head[9:12]), int(match.group(1))


def read_answer(sock: socket.socket, buf: bytearray) -> int:
    """Read one whole answer from ``sock`` (``buf`` keeps what was read past it); its status."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        _fill(sock, buf)
    status, length = head_info(bytes(buf[:end]))
    need = end + 4 + length
    while len(buf) < need:
        _fill(sock, buf)
    del buf[:need]
    return status


def _fill(sock: socket.socket, buf: bytearray) -> None:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    buf += chunk


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (exited ones included)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_seconds(cpu: int) -> float:
    """How long CPU ``cpu`` was not idle, whoever ran (the hypervisor's steal included)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"cpu%d " % cpu):
                user, nice, system, _idle, _iowait, irq, softirq, steal = line.split()[1:9]
                busy = sum(map(int, (user, nice, system, irq, softirq, steal)))
                return busy / os.sysconf("SC_CLK_TCK")
    raise ValueError(f"no cpu{cpu} in /proc/stat")


Sample = tuple[float, float, float | None]


def sample(pid: int, cpu: int | None) -> Sample:
    """(now, the CPU time of ``pid``, the busy time of the CPU it is pinned to, if known)."""
    return time.perf_counter(), cpu_seconds(pid), None if cpu is None else core_busy_seconds(cpu)


def usage(first: Sample, last: Sample) -> dict[str, float]:
    """Between two samples: the process's CPU time, its share of one CPU, and the share of its
    CPU that other processes (or the hypervisor) took meanwhile."""
    wall, cpu = last[0] - first[0], last[1] - first[1]
    out = {"wall_s": wall, "cpu_s": cpu, "cpu_util": cpu / wall}
    if first[2] is not None and last[2] is not None:
        out["others_share"] = max(0.0, last[2] - first[2] - cpu) / wall
    return out


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999), "max": ordered[-1]}


# -- fixed rate, open loop -------------------------------------------------------------------


def fixed(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, rate = spec["host"], spec["port"], float(spec["rate"])
    warmup, duration, conns = float(spec["warmup"]), float(spec["duration"]), spec["connections"]
    request = request_bytes(host, port, spec["path"])
    total = int(rate * (warmup + duration))
    start = time.perf_counter() + 0.2  # the threads connect meanwhile
    window = (start + warmup, start + warmup + duration)
    deadline = window[1] + GRACE_S
    # per request: (scheduled, sent, finished, answered with a 2xx)
    records: list[list[tuple[float, float, float, bool]]] = [[] for _ in range(conns)]
    # how late a thread woke up for a request its idle connection was waiting to send
    idle_lags: list[list[float]] = [[] for _ in range(conns)]

    def connection(j: int) -> None:
        sock: socket.socket | None = None
        buf = bytearray()
        out, wake_lags = records[j], idle_lags[j]
        for i in range(j, total, conns):
            scheduled = start + i / rate
            idle = (delay := scheduled - time.perf_counter()) > 0
            if idle:
                time.sleep(delay)
            sent = time.perf_counter()
            if idle:
                wake_lags.append(sent - scheduled)
            if sent > deadline:  # the server is stuck: give up on the rest
                out.append((scheduled, sent, sent, False))
                continue
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=spec["timeout"])
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf.clear()
                sock.sendall(request)
                ok = 200 <= read_answer(sock, buf) < 300
            except (OSError, ValueError):
                ok = False
                if sock is not None:
                    sock.close()
                sock = None
            out.append((scheduled, sent, time.perf_counter(), ok))
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=connection, args=(j,), daemon=True) for j in range(conns)]
    for thread in threads:
        thread.start()
    pid, core = spec.get("cpu_pid"), spec.get("service_cpu")
    time.sleep(max(0.0, window[0] - time.perf_counter()))
    first = sample(pid, core) if pid else None
    time.sleep(max(0.0, window[1] - time.perf_counter()))
    last = sample(pid, core) if pid else None
    for thread in threads:
        thread.join(max(0.0, deadline + spec["timeout"] - time.perf_counter()))

    flat = [r for out in records for r in out if r[0] >= window[0]]
    good = [r for r in flat if r[3]]
    result: dict[str, Any] = {
        "mode": "fixed",
        "rate": rate,
        "scheduled": len(flat),
        "ok": len(good),
        "failed": len(flat) - len(good),
        "latency_ms": percentiles([(r[2] - r[0]) * 1000 for r in good]),
        "service_ms": percentiles([(r[2] - r[1]) * 1000 for r in good]),
        "send_lag_ms": percentiles([(r[1] - r[0]) * 1000 for r in flat]),
        "idle_wake_lag_ms": percentiles([lag * 1000 for lags in idle_lags for lag in lags]),
        "achieved_rps": len(good) / duration,
    }
    if first and last:
        answered = sum(1 for out in records for r in out if r[3] and first[0] <= r[2] <= last[0])
        result.update(usage(first, last), answered_in_window=answered)
        result["cpu_us_per_request"] = result["cpu_s"] / answered * 1e6 if answered else None
    return result


# -- closed loop (the fallback when wrk is missing) --------------------------------------------


async def closed(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, duration = spec["host"], spec["port"], float(spec["duration"])
    request = request_bytes(host, port, spec["path"])
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    counts = {"ok": 0, "non_2xx": 0, "errors": 0}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while loop.time() < stop_at:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), spec["timeout"])
                status, length = head_info(head[:-4])
                await asyncio.wait_for(reader.readexactly(length), spec["timeout"])
                counts["ok" if 200 <= status < 300 else "non_2xx"] += 1
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            counts["errors"] += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(spec["connections"])))
    seconds = time.perf_counter() - t0
    requests = counts["ok"] + counts["non_2xx"]
    return {
        "tool": "python",
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds,
        **counts,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = fixed(spec) if spec["mode"] == "fixed" else asyncio.run(closed(spec))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
