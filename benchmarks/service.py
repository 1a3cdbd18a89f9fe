"""The SDKs inside a real service: a FastAPI app under uvicorn, one POST route calling track().

    python benchmarks/service.py                 # the full run, ~10 minutes on 2 cores
    python benchmarks/service.py --quick         # a smoke run of about 2 minutes
    python benchmarks/service.py --parts service --configs none,ours --reps 5 --duration 20
    python benchmarks/service.py --ours-python .venv/bin/python --official-python ... --help

**The service** (``benchmarks/service/app.py``): FastAPI under uvicorn with uvloop and
httptools, ``POST /payments/{user_id}/failed`` building a 3-key properties dict and calling the
SDK once. Configurations: **none** (the route tracks nothing: the baseline), **ours**
(``whisperr.init()`` in the lifespan and ``whisperr.track()``, as the README shows), **official**
(whisperr 0.2.1, ``Whisperr(...).track()``) and **posthog** (``AsyncPosthog(...).capture()``),
each with its default settings; and **floor**, no SDK but the least any in-process queue can
cost (orjson encodes the properties, a tuple goes on a deque, nothing is validated or sent),
which says how much of what the SDKs cost any such design pays here. The official SDK also
imports as ``whisperr``, so every SDK runs in its own interpreter (``--ours-python``,
``--official-python``, ``--posthog-python``; by default cached venvs under
``~/.cache/whisperr-bench/service-*``, built on first use).

**The processes** (127.0.0.1 only): uvicorn pinned to the first CPU; on the second, this script,
the load generator and the ingestion sink, ``python -m whisperr.server --no-validate`` (posthog
POSTs to its lenient ``/_lenient/batch/`` endpoint, which parses the JSON and counts). Each
repetition starts a fresh uvicorn per configuration, in an order rotated every repetition.

Figures, per configuration (medians over ``--reps``):

- **saturated req/s**: ``wrk -t1 -c50`` (closed loop) for ``--duration`` s after ``--warmup``
  s; without wrk, an asyncio closed-loop client (``service/loadgen.py``). **kept** is the
  configuration's median ÷ none's median.
- **server CPU per request** at ``--rate`` (2,000) req/s: user + system CPU time of the uvicorn
  process (every thread: the official SDK's sender thread counts), from ``/proc/<pid>/stat``
  over the measured window, ÷ the answers received in it. **Δ CPU** subtracts none's.
- **p50 / p99 latency** at that rate: an open-loop client (``service/loadgen.py``: 16 keep-alive
  connections, one thread each, each request on a fixed schedule), measured from each request's
  *scheduled* send time to the end of its answer, so that a stall is charged for every request
  it delays. The generator's own lag (actual minus scheduled send) is in the JSON.
- **delivered / tracked**: events the sink stored (distinct ``$message_id``; posthog: the
  lenient count) after uvicorn shut down gracefully (the lifespan flushes), against the route
  calls the app counted itself; never the SDKs' own figures.
- **track() p50 / p99 / p99.9**: each SDK call in the route timed with ``perf_counter_ns``
  inside the service (two clock reads, ~0.1 µs, in every request of every SDK configuration),
  over the fixed-rate window; the saturated window's are in the JSON.

Then, outside the service (``--parts burst,startup``):

- **burst drain** (``service/burst.py``, pinned like uvicorn, uvloop): ``--burst-events``
  (100,000) tracked in one synchronous loop inside a running event loop, then the SDK's flush
  awaited (official: its blocking ``flush()`` in a thread). A ticker task sleeping
  ``--tick-ms`` (1 ms: uvloop rounds shorter timers to 0 and the ticker would spin) records how
  late it wakes; the **longest stall** is the largest lag of the ticks that started after the
  tracking loop, i.e. while the SDK drained. Also the tracking loop's time, the **drain** time
  (end of tracking to flush returned), and what the sink received. The **floor** row does the
  same with no SDK: a deque of orjson-encoded tuples, drained 100 events a step (about 50 µs)
  without sending; its stalls are the machine's own (preemption by the host, the collector).
- **import**: ``import whisperr`` (posthog: ``import posthog``) timed with ``perf_counter`` in
  a fresh ``python -c`` process, and the same up to the client class too (``AsyncClient``,
  ``Whisperr``, ``AsyncPosthog``): this project's ``import whisperr`` is lazy and loads httpx,
  anyio and the rest only at the first attribute used; median of ``--startup-runs``.
- Before both, this project's modules are byte-compiled (``compileall``), as pip does for the
  other SDKs at install: an editable checkout's bytecode is stale after every change.
- **first delivered event**: wall time from spawning a fresh ``python -c`` that imports the SDK,
  makes a client, tracks one event and flushes, until the sink has stored it (polled every
  millisecond from here); median of ``--startup-runs``. The **floor** row is this project's
  dependencies alone (``import asyncio, anyio, attrs, h11, httpx, orjson`` in a fresh process,
  then exit): what any SDK built on them pays before its first event.

Every service run also records, in the JSON and under *Every run*, the share of uvicorn's CPU
that other processes took meanwhile (``/proc/stat``; on a shared box the figures move with it)
and the load generator's own wake-up lag. Results: a table on stdout, and
``benchmarks/results/service-<date>.md`` and ``.json`` (with ``--quick``, under the venv cache
instead), with the command and a machine line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent / "service"))

import _harness as h
import loadgen

SERVICE_DIR = h.BENCH_DIR / "service"
CONFIGS = ("none", "ours", "official", "posthog", "floor")
UNSENT = ("none", "floor")  # configurations that send nothing
SDKS = ("ours", "official", "posthog")
WITH_FLOOR = (*SDKS, "floor")  # the burst and start-up parts: the SDKs, then the floor
PARTS = ("service", "burst", "startup")
KEY = "wrk_bench"
ROUTE = "/payments/user_8842/failed"
STACK = ["fastapi", "uvicorn", "uvloop", "httptools"]
PACKAGES = {
    "ours": ["-e", str(h.REPO), *STACK],
    "official": [h.OFFICIAL_PIN, *STACK],
    "posthog": ["posthog[async]", *STACK],
}
STACK_CHECK = "import fastapi, uvicorn, uvloop, httptools"
CHECKS = {
    "ours": f"{STACK_CHECK}; import whisperr.server; whisperr.AsyncClient",
    "official": f"{STACK_CHECK}; import whisperr; assert whisperr.__version__ == '0.2.1'",
    "posthog": f"{STACK_CHECK}; import posthog, httpx; posthog.AsyncPosthog",
}
# The module each SDK imports as, and its client class: `import whisperr` of this project is
# lazy (its submodules load at the first attribute used), so both times are measured.
IMPORTED = {"ours": "whisperr", "official": "whisperr", "posthog": "posthog"}
CLIENT_CLASS = {"ours": "AsyncClient", "official": "Whisperr", "posthog": "AsyncPosthog"}
RATE_CONNECTIONS = 16
STARTUP_FIELDS = ("import_ms", "client_class_ms", "first_ms", "exit_ms")
GRACE_S = 60.0  # added to every subprocess timeout
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: no proxy

IMPORT_CODE = (
    "import time; t0 = time.perf_counter(); import {module}; t1 = time.perf_counter(); "
    "{module}.{cls}; print(t1 - t0, time.perf_counter() - t0)"
)
# The start-up floor: the dependencies this project is built on (asyncio, anyio and its backend,
# attrs, h11, httpx, orjson) imported in a fresh process, and nothing else.
DEPENDENCIES_CODE = (
    "import time; t0 = time.perf_counter(); "
    "import asyncio, anyio, anyio._backends._asyncio, attrs, h11, httpx, orjson; "
    "print(time.perf_counter() - t0)"
)
# Each gets the sink's URL as sys.argv[1]: import, one client, one event, flush, close.
FIRST_EVENT_CODE = {
    "ours": """
import asyncio, sys, whisperr
async def main():
    async with whisperr.AsyncClient(api_key="wrk_bench", base_url=sys.argv[1]) as client:
        client.track("user_8842", "payment_failed", {"amount_cents": 4900})
        await client.flush()
asyncio.run(main())
""",
    "official": """
import sys, whisperr
client = whisperr.Whisperr("wrk_bench", base_url=sys.argv[1])
client.track("user_8842", "payment_failed", {"amount_cents": 4900})
client.flush()
client.shutdown()
""",
    "posthog": """
import asyncio, sys, posthog
async def main():
    client = posthog.AsyncPosthog("phc_bench", host=sys.argv[1] + "/_lenient")
    client.capture("payment_failed", distinct_id="user_8842", properties={"amount_cents": 4900})
    await client.flush()
    await client.shutdown()
asyncio.run(main())
""",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS)
    )
    p.add_argument("--duration", type=int, help="seconds of each load phase (default 10)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up before each (default 2)")
    p.add_argument("--reps", type=int, help="repetitions of the service runs (default 3)")
    p.add_argument("--rate", type=float, default=2000.0, help="fixed rate, req/s (default 2000)")
    p.add_argument("--connections", type=int, default=50, help="saturating connections (50)")
    p.add_argument("--burst-events", type=int, help="events of the burst drain (default 100000)")
    p.add_argument("--burst-reps", type=int, help="repetitions of the burst drain (default 3)")
    p.add_argument("--tick-ms", type=float, default=1.0, help="the ticker's sleep (default 1 ms)")
    p.add_argument("--startup-runs", type=int, help="runs of import and first event (default 11)")
    p.add_argument("--no-wrk", action="store_true", help="saturate with the Python client")
    p.add_argument("--quick", action="store_true", help="a smoke run: short, one repetition")
    p.add_argument("--ours-python", help="interpreter with this project + " + " ".join(STACK))
    p.add_argument("--official-python", help="interpreter with whisperr==0.2.1 + the same")
    p.add_argument("--posthog-python", help="interpreter with posthog[async] + the same")
    p.add_argument("--venv-dir", type=Path, help=f"venv cache (default {h.default_cache_dir()})")
    p.add_argument("--results-dir", type=Path, help="default benchmarks/results (--quick: cache)")
    args = p.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (2 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.reps = args.reps or (1 if quick else 3)
    args.burst_events = args.burst_events or (10_000 if quick else 100_000)
    args.burst_reps = args.burst_reps or (1 if quick else 3)
    args.startup_runs = args.startup_runs or (3 if quick else 11)
    args.parts = [x for x in args.parts.split(",") if x]
    args.configs = [x for x in args.configs.split(",") if x]
    if unknown := (set(args.parts) - set(PARTS)) | (set(args.configs) - set(CONFIGS)):
        p.error(f"unknown part or configuration: {', '.join(sorted(unknown))}")
    args.venv_dir = (args.venv_dir or h.default_cache_dir()).expanduser().resolve()
    if args.results_dir is None:
        args.results_dir = args.venv_dir / "quick-results" if quick else h.BENCH_DIR / "results"
    return args


# -- processes and CPUs ----------------------------------------------------------------------


def cpus() -> tuple[int, int] | None:
    """(the service's CPU, the load's CPU), or None where processes cannot be pinned."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    return (mine[0], mine[1]) if len(mine) >= 2 else None


PINS = cpus()


def pin(pid: int, which: int) -> None:
    """Pin ``pid`` to the service's CPU (0) or the load's (1); a no-op without pinning."""
    if PINS is not None:
        os.sched_setaffinity(pid, {PINS[which]})


def stop(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status (negative: a signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def run_pinned(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` on the service's CPU, from a neutral directory, killed after ``timeout``."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=h.clean_env(),
        cwd=tempfile.gettempdir(),  # never the repo's whisperr on sys.path
    )
    pin(proc.pid, 0)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\nkilled after {timeout:.0f} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def result_line(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The ``RESULT {json}`` a helper printed, or an ``error`` record."""
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return {"error": f"exit {done.returncode}: {tail}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, method: str = "GET", timeout: float = 10.0) -> Any:
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read())


# -- interpreters ----------------------------------------------------------------------------


def interpreter(sdk: str, explicit: str | None, cache: Path) -> Path:
    """``explicit`` if it has what ``sdk`` needs; else this interpreter (ours only) if it does;
    else a cached venv, built on first use."""
    if explicit:
        if not h._works(explicit, CHECKS[sdk]):
            raise SystemExit(f"--{sdk}-python {explicit}: `{CHECKS[sdk]}` fails there")
        return Path(explicit)
    if sdk == "ours" and h._works(sys.executable, CHECKS[sdk]):
        return Path(sys.executable)
    return h.ensure_venv(cache / f"service-{sdk}", PACKAGES[sdk], CHECKS[sdk])


def versions(python: Path, sdk: str) -> dict[str, str]:
    dist = {"ours": "whisperr-async", "official": "whisperr", "posthog": "posthog"}[sdk]
    names = [dist, *STACK]
    return {name: h.package_version(python, name) for name in names}


# -- the service -----------------------------------------------------------------------------


class Service:
    """uvicorn serving ``app.py`` for one configuration, pinned to the service's CPU; a context
    manager that starts it and stops it (SIGTERM: the lifespan's shutdown flushes the SDK)."""

    def __init__(self, python: Path, config: str, sink_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            *(str(python), "-m", "uvicorn", "app:app", "--app-dir", str(SERVICE_DIR)),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
            *("--log-level", "warning", "--timeout-graceful-shutdown", "10"),
        ]
        self.env = {k: v for k, v in h.clean_env().items() if not k.startswith("WHISPERR_")}
        self.env.update(
            SVC_SDK=config, SVC_SINK=sink_url, WHISPERR_API_KEY=KEY, WHISPERR_BASE_URL=sink_url
        )
        self.returncode: int | None = None

    def __enter__(self) -> Service:
        self.log = tempfile.TemporaryFile(mode="w+")  # closed in __exit__
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=tempfile.gettempdir(),  # never the repo's whisperr on sys.path
        )
        pin(self.proc.pid, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.returncode = stop(self.proc)
        finally:
            self.log.close()

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                return self.stats()
            time.sleep(0.05)
        raise RuntimeError(f"uvicorn did not start: {self.output()}")

    def stats(self) -> dict[str, Any]:
        return dict(call(self.url + "/_bench/stats"))

    def reset(self) -> None:
        call(self.url + "/_bench/reset", "POST")

    def output(self) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().strip().splitlines()[-5:])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python: dict[str, Path] = {}
        self.versions: dict[str, dict[str, str]] = {}
        self.wrk = None if args.no_wrk else shutil.which("wrk")
        self.service_runs: list[dict[str, Any]] = []
        self.burst_runs: list[dict[str, Any]] = []
        self.startup_runs: list[dict[str, Any]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="whisperr-service-")
        self.wrk_script = Path(self._tmp.name) / "post.lua"
        self.wrk_script.write_text('wrk.method = "POST"\nwrk.headers["Content-Length"] = "0"\n')

    def setup(self) -> None:
        a = self.args
        needed = {"ours"}  # it also runs the sink and the none configuration
        if "service" in a.parts:
            needed |= set(a.configs) - set(UNSENT)
        if {"burst", "startup"} & set(a.parts):
            needed |= set(SDKS)
        for sdk in (s for s in SDKS if s in needed):
            explicit = getattr(a, f"{sdk}_python")
            self.python[sdk] = interpreter(sdk, explicit, a.venv_dir)
            self.versions[sdk] = versions(self.python[sdk], sdk)
            h.log(f"[setup] {sdk:<9} {self.python[sdk]}  {self.versions[sdk]}")
        self.python["none"] = self.python["floor"] = self.python["ours"]  # floor: its orjson

    def load_line(self) -> str:
        if self.wrk:
            first = subprocess.run(
                [self.wrk, "-v"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.splitlines()
            tool = first[0].split(" Copyright")[0] if first else "wrk"
        else:
            tool = "the Python closed-loop client (wrk not found)"
        pins = "not pinned" if PINS is None else f"uvicorn on CPU {PINS[0]}, the rest on {PINS[1]}"
        return f"saturation: {tool}, {self.args.connections} connections; {pins}"

    # -- the service runs -------------------------------------------------------------------

    def run_service(self, sink: h.Server) -> None:
        a = self.args
        for rep in range(a.reps):
            h.log(f"[service] repetition {rep + 1}/{a.reps}")
            for config in h.rotated(a.configs, rep):
                run = {"config": config, "rep": rep, **self.service_run(config, sink)}
                self.service_runs.append(run)
                h.log(f"  {config:<9} {describe_service(run)}")

    def service_run(self, config: str, sink: h.Server) -> dict[str, Any]:
        sink.reset()
        with Service(self.python[config], config, sink.url) as service:
            try:
                out = self.load_phases(config, service)
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                out = {"error": f"{type(exc).__name__}: {exc} {service.output()}"}
        out["exit"] = service.returncode
        counts = sink.counts()  # once uvicorn has shut down, and so flushed
        out["delivered"] = counts["lenient"] if config == "posthog" else counts["unique"]
        return out

    def load_phases(self, config: str, service: Service) -> dict[str, Any]:
        """Warm-up, saturated, then fixed-rate load on a started service."""
        a = self.args
        info = service.wait_ready()
        if problem := wrong_module(config, info["module_file"]):
            raise RuntimeError(problem)
        out: dict[str, Any] = {"module_file": info["module_file"]}
        pid, core = service.proc.pid, None if PINS is None else PINS[0]
        if a.warmup:
            self.saturate(service.port, a.warmup)
        service.reset()
        first = loadgen.sample(pid, core)
        sat = out["saturated"] = self.saturate(service.port, a.duration)
        sat.update(loadgen.usage(first, loadgen.sample(pid, core)))
        sat["cpu_us_per_request"] = (
            sat["cpu_s"] / sat["requests"] * 1e6 if sat["requests"] else None
        )
        out["track_saturated_us"] = service.stats()["track_us"]
        time.sleep(1.0)  # the SDK delivers its backlog from the saturated phase
        service.reset()
        out["fixed"] = self.fixed_rate(service.port, pid)
        final = service.stats()
        out["track_fixed_us"], out["calls"] = final["track_us"], final["calls"]
        return out

    def saturate(self, port: int, seconds: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}{ROUTE}"
        if self.wrk is None:
            spec = {
                "mode": "closed",
                "host": "127.0.0.1",
                "port": port,
                "path": ROUTE,
                "duration": seconds,
                "connections": self.args.connections,
                "timeout": 5,
            }
            done = subprocess.run(
                [sys.executable, str(SERVICE_DIR / "loadgen.py"), json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=seconds + GRACE_S,
                check=False,
            )
            result = result_line(done)
            if "error" in result:
                raise RuntimeError(f"load generator: {result['error']}")
            return result
        cmd = [
            self.wrk,
            "-t1",
            f"-c{self.args.connections}",
            f"-d{max(1, seconds)}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(self.wrk_script),
            url,
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + GRACE_S, check=False
        )
        return parse_wrk(done.stdout)

    def fixed_rate(self, port: int, pid: int) -> dict[str, Any]:
        a = self.args
        spec = {
            "mode": "fixed",
            "host": "127.0.0.1",
            "port": port,
            "path": ROUTE,
            "rate": a.rate,
            "warmup": a.warmup,
            "duration": a.duration,
            "connections": RATE_CONNECTIONS,
            "timeout": 5,
            "cpu_pid": pid,
            "service_cpu": None if PINS is None else PINS[0],
        }
        done = subprocess.run(
            [sys.executable, str(SERVICE_DIR / "loadgen.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=a.warmup + a.duration + 2 * GRACE_S,
            check=False,
        )
        result = result_line(done)
        if "error" in result:
            raise RuntimeError(f"fixed-rate client: {result['error']}")
        return result

    # -- the burst drain --------------------------------------------------------------------

    def run_burst(self, sink: h.Server) -> None:
        a = self.args
        for rep in range(a.burst_reps):
            h.log(f"[burst] repetition {rep + 1}/{a.burst_reps}: {a.burst_events:,} events")
            for sdk in h.rotated(WITH_FLOOR, rep):
                sink.reset()
                spec = {
                    "sdk": sdk,
                    "url": sink.url,
                    "n": a.burst_events,
                    "tick_s": a.tick_ms / 1000,
                    "budget": 300,
                }
                cmd = [str(self.python[sdk]), str(SERVICE_DIR / "burst.py"), json.dumps(spec)]
                run = {"sdk": sdk, "rep": rep, **result_line(run_pinned(cmd, 300 + GRACE_S))}
                counts = sink.counts()
                run["delivered"] = counts["lenient"] if sdk == "posthog" else counts["unique"]
                run["expected"] = 0 if sdk == "floor" else a.burst_events + 1  # and the warm-up
                self.burst_runs.append(run)
                h.log(f"  {sdk:<9} {describe_burst(run)}")

    # -- import and first event -------------------------------------------------------------

    def run_startup(self, sink: h.Server) -> None:
        a = self.args
        h.log(f"[startup] {a.startup_runs} runs each, alternated")
        # Bytecode, as pip writes it at install: this project is installed editable, and a
        # checkout's .pyc files go stale with every change (and PYTHONDONTWRITEBYTECODE keeps
        # them so), which made its start-up compile the modules changed since, every run.
        package = str(h.REPO / "whisperr")
        run_pinned([str(self.python["ours"]), "-m", "compileall", "-q", package], 120)
        for sdk in SDKS:  # once untimed: the page cache and .pyc files
            run_pinned([str(self.python[sdk]), "-c", FIRST_EVENT_CODE[sdk], sink.url], 60)
        for i in range(a.startup_runs):
            for sdk in h.rotated(SDKS, i):
                code = IMPORT_CODE.format(module=IMPORTED[sdk], cls=CLIENT_CLASS[sdk])
                done = run_pinned([str(self.python[sdk]), "-c", code], 60)
                run: dict[str, Any] = {"sdk": sdk, "run": i, "import_ms": None}
                run["client_class_ms"] = None
                if done.returncode == 0:
                    run["import_ms"], run["client_class_ms"] = (
                        float(x) * 1000 for x in done.stdout.split()
                    )
                run.update(self.first_event(sdk, sink))
                self.startup_runs.append(run)
            self.startup_runs.append(self.dependencies_alone(i))
        for sdk in WITH_FLOOR:
            mine = [r for r in self.startup_runs if r["sdk"] == sdk]
            h.log(
                f"  {sdk:<9} import {fmt_list([r['import_ms'] for r in mine])} ms, "
                f"first event {fmt_list([r['first_ms'] for r in mine])} ms"
            )

    def dependencies_alone(self, i: int) -> dict[str, Any]:
        """The floor: a fresh process that imports this project's dependencies, then exits."""
        t0 = time.perf_counter()
        done = run_pinned([str(self.python["ours"]), "-c", DEPENDENCIES_CODE], 60)
        exited = time.perf_counter()
        imported = float(done.stdout) * 1000 if done.returncode == 0 else None
        return {
            "sdk": "floor",
            "run": i,
            "import_ms": imported,
            "client_class_ms": imported,
            "first_ms": None,
            "exit_ms": (exited - t0) * 1000,
            "returncode": done.returncode,
        }

    def first_event(self, sdk: str, sink: h.Server, timeout: float = 30.0) -> dict[str, Any]:
        """Spawn the one-event script; poll the sink until it holds the event."""
        sink.reset()
        field = "lenient" if sdk == "posthog" else "unique"
        cmd = [str(self.python[sdk]), "-c", FIRST_EVENT_CODE[sdk], sink.url]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=h.clean_env(),
            cwd=tempfile.gettempdir(),
        )
        pin(proc.pid, 0)
        first = exited = None
        try:
            while (now := time.perf_counter()) - t0 < timeout:
                if exited is None and proc.poll() is not None:
                    exited = now
                if sink.counts()[field] >= 1:
                    first = time.perf_counter()
                    break
                time.sleep(0.001)
            proc.wait(timeout)
            exited = exited or time.perf_counter()
        finally:
            stop(proc)
        return {
            "first_ms": None if first is None else (first - t0) * 1000,
            "exit_ms": (exited - t0) * 1000 if exited else None,
            "returncode": proc.returncode,
        }


def wrong_module(config: str, file: str) -> str | None:
    """Why the service imported the wrong SDK, if it did (the repo's whisperr for official)."""
    if config == "ours" and not h.imported_from(file, h.REPO):
        return f"ours imported {file}, not this project"
    if config == "official" and h.imported_from(file, h.REPO):
        return f"official imported this project ({file})"
    return None


def parse_wrk(text: str) -> dict[str, Any]:
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s|m)\b", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rps:
        raise RuntimeError(f"cannot read wrk's output: {text.strip()[-300:]}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", text, re.M))
    return {
        "tool": "wrk",
        "requests": int(done.group(1)),
        "rps": float(rps.group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "wrk_latency": latency,  # closed loop: coordinated omission, for reference only
    }


# -- summary ---------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def dig(run: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(run, dict):
            return None
        run = run.get(key)  # type: ignore[assignment]
    return run


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    got = [v for v in values if v is not None]
    return {"median": med(got), "min": min(got, default=None), "max": max(got, default=None)}


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def fmt_list(values: Sequence[float | None], digits: int = 1) -> str:
    return " ".join(fmt(v, digits) for v in values)


def describe_service(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"ERROR {run['error']}"
    sat, fixed = run["saturated"], run["fixed"]
    return (
        f"{sat['rps']:,.0f} req/s saturated ({sat['cpu_util']:.0%} of a CPU); at "
        f"{fixed['rate']:,.0f}/s {fmt(fixed.get('cpu_us_per_request'), 1)} µs CPU/req, "
        f"p50 {fmt(dig(fixed, 'latency_ms', 'p50'), 2)} ms, "
        f"p99 {fmt(dig(fixed, 'latency_ms', 'p99'), 2)} ms, {fixed['failed']} failed; "
        f"delivered {run['delivered']:,} / {run['calls']:,}; others used uvicorn's CPU "
        f"{fmt(percent(sat.get('others_share')))}% (saturated), "
        f"{fmt(percent(fixed.get('others_share')))}% (fixed rate); generator wake-up lag p99 "
        f"{fmt(dig(fixed, 'idle_wake_lag_ms', 'p99'), 2)} ms"
    )


def percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def describe_burst(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"ERROR {run['error']}"
    return (
        f"track loop {run['track_loop_ms']:,.0f} ms, drain {run['drain_ms']:,.0f} ms, "
        f"longest stall {fmt(run['max_stall_ms'], 1)} ms, "
        f"delivered {run['delivered']:,} / {run['expected']:,}"
    )


def summarize(bench: Bench) -> dict[str, Any]:
    a = bench.args
    service: dict[str, Any] = {}
    for config in a.configs if "service" in a.parts else ():
        runs = [r for r in bench.service_runs if r["config"] == config and "error" not in r]
        service[config] = {
            "runs": len(runs),
            "rps": med([dig(r, "saturated", "rps") for r in runs]),
            "cpu_us": med([dig(r, "fixed", "cpu_us_per_request") for r in runs]),
            "p50_ms": med([dig(r, "fixed", "latency_ms", "p50") for r in runs]),
            "p99_ms": med([dig(r, "fixed", "latency_ms", "p99") for r in runs]),
            "failed": sum(dig(r, "fixed", "failed") or 0 for r in runs),
            "delivered": sum(r["delivered"] for r in runs),
            "tracked": sum(r["calls"] for r in runs) if config != "none" else 0,
            "track_us": {
                q: med([dig(r, "track_fixed_us", q) for r in runs]) for q in ("p50", "p99", "p99.9")
            },
        }
    base = service.get("none", {})
    for config, row in service.items():
        row["kept"] = row["rps"] / base["rps"] if row["rps"] and base.get("rps") else None
        row["cpu_delta_us"] = (
            row["cpu_us"] - base["cpu_us"] if row["cpu_us"] and base.get("cpu_us") else None
        )
        row["kept_each_rep"] = paired(bench.service_runs, config, ("saturated", "rps"), "/")
        row["cpu_delta_each_rep"] = paired(
            bench.service_runs, config, ("fixed", "cpu_us_per_request"), "-"
        )
    burst = {}
    for sdk in WITH_FLOOR if "burst" in a.parts else ():
        runs = [r for r in bench.burst_runs if r["sdk"] == sdk and "error" not in r]
        burst[sdk] = {
            "runs": len(runs),
            **{
                k: med([r[k] for r in runs])
                for k in (
                    "track_loop_ms",
                    "drain_ms",
                    "max_stall_ms",
                    "p99_stall_ms",
                    "idle_max_lag_ms",
                )
            },
            "delivered": [f"{r['delivered']:,} / {r['expected']:,}" for r in runs],
        }
    startup = {}
    for sdk in WITH_FLOOR if "startup" in a.parts else ():
        runs = [r for r in bench.startup_runs if r["sdk"] == sdk]
        startup[sdk] = {key: spread([r[key] for r in runs]) for key in STARTUP_FIELDS}
    return {"service": service, "burst": burst, "startup": startup}


def paired(
    runs: Sequence[dict[str, Any]], config: str, path: tuple[str, ...], op: str
) -> list[float | None]:
    """``config``'s figure at ``path`` divided by (or minus) none's, repetition by repetition:
    on a busy box the two runs of one repetition are closer in time than the medians."""
    by_rep: dict[tuple[str, int], float | None] = {
        (r["config"], r["rep"]): dig(r, *path) for r in runs if "error" not in r
    }
    out: list[float | None] = []
    for (name, rep), value in sorted(by_rep.items(), key=lambda item: item[0][1]):
        base = by_rep.get(("none", rep))
        if name != config or value is None or not base:
            continue
        out.append(value / base if op == "/" else value - base)
    return out


LABELS = {
    "none": "none (no tracking)",
    "ours": "ours: `whisperr.track()`",
    "official": "official 0.2.1: `Whisperr.track()`",
    "posthog": "posthog: `AsyncPosthog.capture()`",
    "floor": "floor: orjson + `deque.append()`, nothing sent",
}


def tables(bench: Bench, summary: dict[str, Any]) -> list[str]:
    a = bench.args
    lines: list[str] = []
    if service := summary["service"]:
        lines += [
            f"### In the service ({a.reps} repetitions, medians; {a.duration} s a phase)",
            "",
            f"| configuration | saturated req/s | kept | server CPU µs/req at {a.rate:,.0f}/s "
            f"| Δ CPU vs none | p50 ms | p99 ms | delivered / tracked | track() p50 / p99 / "
            "p99.9 µs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for config, row in service.items():
            t = row["track_us"]
            delivered = "n/a" if config in UNSENT else f"{row['delivered']:,} / {row['tracked']:,}"
            track = "n/a" if config == "none" else " / ".join(fmt(t[q], 2) for q in t)
            lines.append(
                f"| {LABELS[config]} | {fmt(row['rps'])} | {fmt(row['kept'], 3, 'x')} | "
                f"{fmt(row['cpu_us'], 1)} | {fmt(row['cpu_delta_us'], 1)} | "
                f"{fmt(row['p50_ms'], 2)} | {fmt(row['p99_ms'], 2)} | {delivered} | {track} |"
            )
        lines += [
            "",
            "Repetition by repetition (each against none's run in the same repetition):",
            "",
        ]
        for config, row in service.items():
            if config != "none":
                kept = ", ".join(fmt(v, 3, "x") for v in row["kept_each_rep"])
                delta = ", ".join(fmt(v, 1) for v in row["cpu_delta_each_rep"])
                lines.append(f"- {config}: kept {kept}; Δ CPU µs/req {delta}")
        lines.append("")
    if burst := summary["burst"]:
        lines += [
            f"### Burst drain: {a.burst_events:,} events tracked in one go, then flush "
            f"({a.burst_reps} repetitions, medians; ticker {a.tick_ms:g} ms)",
            "",
            "| SDK | tracking loop ms | drain ms | longest stall during drain ms | p99 tick lag ms "
            "| idle max lag ms | delivered / expected |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for sdk, row in burst.items():
            lines.append(
                f"| {sdk} | {fmt(row['track_loop_ms'])} | {fmt(row['drain_ms'])} | "
                f"{fmt(row['max_stall_ms'], 1)} | {fmt(row['p99_stall_ms'], 2)} | "
                f"{fmt(row['idle_max_lag_ms'], 2)} | {', '.join(row['delivered'])} |"
            )
        lines.append("")
    if startup := summary["startup"]:
        lines += [
            f"### Start-up: fresh processes ({a.startup_runs} runs, median (min to max))",
            "",
            "| SDK | `import` ms | `import` + client class ms | first delivered event ms "
            "| process exit ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for sdk, row in startup.items():
            cells = [
                f"{fmt(row[k]['median'], 1)} ({fmt(row[k]['min'], 1)} to {fmt(row[k]['max'], 1)})"
                for k in STARTUP_FIELDS
            ]
            lines.append(f"| {sdk} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(bench: Bench, summary: dict[str, Any], command: str, machine: str) -> str:
    lines = [
        "# whisperr in a service: FastAPI + uvicorn (uvloop, httptools)",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine}",
        f"- This SDK: {h.git_commit()}",
        "- Interpreters and versions: "
        + "; ".join(
            f"{sdk} `{bench.python[sdk]}` "
            + ", ".join(f"{k} {v}" for k, v in bench.versions[sdk].items())
            for sdk in bench.versions
        ),
        f"- Load: {bench.load_line()}; fixed rate: the Python open-loop client, "
        f"{RATE_CONNECTIONS} connections, latency from each request's scheduled send time",
        "",
        *tables(bench, summary),
        "## Every run",
        "",
    ]
    for run in bench.service_runs:
        lines.append(f"- service rep {run['rep'] + 1} {run['config']}: {describe_service(run)}")
    for run in bench.burst_runs:
        lines.append(f"- burst rep {run['rep'] + 1} {run['sdk']}: {describe_burst(run)}")
    lines.append("")
    return "\n".join(lines)


def redact(text: str, bench: Bench) -> str:
    """The results without this machine's paths: each interpreter is named by its role."""
    for sdk, python in bench.python.items():
        text = text.replace(str(Path(python).parent.parent), f"<{sdk} venv>")
    return text.replace(str(h.REPO), "<repo>").replace(str(Path.home()), "~")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/service.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    if PINS is not None:
        pin(os.getpid(), 1)  # this script, and so the sink and the load it starts, off uvicorn's
    machine = h.machine_line()
    h.log(f"[machine] {machine}")
    bench = Bench(args)
    bench.setup()
    h.log(f"[load] {bench.load_line()}")
    t0 = time.perf_counter()
    with h.Server(bench.python["ours"]) as sink:
        if "service" in args.parts:
            bench.run_service(sink)
        if "burst" in args.parts:
            bench.run_burst(sink)
        if "startup" in args.parts:
            bench.run_startup(sink)
    h.log(f"[done] {time.perf_counter() - t0:.0f} s")

    summary = summarize(bench)
    text = redact(markdown(bench, summary, command.strip(), machine), bench)
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"service-{dt.date.today().isoformat()}"
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    raw = {
        "command": command.strip(),
        "machine": machine,
        "commit": h.git_commit(),
        "load": bench.load_line(),
        "python": {k: str(v) for k, v in bench.python.items()},
        "versions": bench.versions,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "service_runs": bench.service_runs,
        "burst_runs": bench.burst_runs,
        "startup_runs": bench.startup_runs,
    }
    stem.with_suffix(".json").write_text(redact(json.dumps(raw, indent=2), bench), encoding="utf-8")
    print("\n".join(tables(bench, summary)))
    print(f"results: {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
