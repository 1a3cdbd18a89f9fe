"""The HTTP transport's cost, side by side in one run: CPU per request and end-to-end events/s.

    python benchmarks/transport.py [--base REF] [--head DIR|REF] [--rounds 12] [--requests 200]
                                   [--e2e-reps 7] [--events 100000] [--no-e2e] [--instructions]

Three variants, each measured in fresh worker processes with ``PYTHONPATH`` at its version:

- ``httpx``: the head's SDK with ``transport=httpx.AsyncHTTPTransport()``;
- ``ours``: the head's SDK with its default transport (``--head``: this work tree by default,
  or a git ref);
- ``base``: the default transport of ``--base REF`` (extracted with ``git archive`` into a
  temporary directory), only when given.

**CPU per request** (``workers/bench_transport.py``): 500-event bodies (about 134 kB) posted
through each version's own request function, ``whisperr._transport.post()``, over the pool its
``Delivery.open()`` makes, to the bundled server in its own process on 127.0.0.1; the process
CPU time (``time.process_time``) of ``--requests`` requests after 20 warm-up ones. **End to end**
(``workers/bench_ours.py``, run.py's benchmark b.): events/s from the first ``track()`` of
``--events`` events until ``aclose()`` returns, counted only when the server then holds every
event once. Rounds alternate the variants (the order rotated every round); the medians, every
sample and the ratios are printed with the machine line. ``--instructions`` adds callgrind's
count of instructions per request (the difference between 250 and 50 requests, over 200).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

PYTHON = Path(sys.executable)
WARMUP = 20
INSTRUCTION_REQUESTS = (50, 250)
E2E_BUDGET = 120.0
# variant -> (which version, the transport the worker gives the client)
VARIANTS = {"httpx": ("head", "httpx"), "ours": ("head", "default"), "base": ("base", "default")}
LABELS = {
    "httpx": "httpx: transport=httpx.AsyncHTTPTransport() (head)",
    "ours": "ours: the default transport (head)",
    "base": "base: the default transport (base ref)",
}
RATIOS = (("ours", "httpx"), ("ours", "base"), ("base", "httpx"))


def cpu_spec(server: h.Server, variant: str, requests: int) -> dict[str, Any]:
    transport = VARIANTS[variant][1]
    return {"url": server.url, "requests": requests, "warmup": WARMUP, "transport": transport}


def cpu_round(server: h.Server, variant: str, root: Path, requests: int) -> dict[str, Any]:
    spec = cpu_spec(server, variant, requests)
    return h.run_worker(PYTHON, "bench_transport.py", spec, 300, root=root)


def e2e_round(server: h.Server, variant: str, root: Path, events: int) -> dict[str, Any]:
    spec = {"bench": "e2e", "n": events, "url": server.url, "budget": E2E_BUDGET}
    spec["transport"] = VARIANTS[variant][1]
    server.reset()
    result = h.run_worker(PYTHON, "bench_ours.py", spec, E2E_BUDGET + 90, root=root)
    counts = server.counts()
    server.reset()
    if "error" not in result and not (counts["stored"] == counts["unique"] == events):
        result["error"] = f"the server holds {counts['unique']:,} of {events:,} events"
    elif "error" not in result and "events_per_s" not in result:
        result["error"] = "aclose() did not finish within the budget"
    return result


def instructions_per_request(server: h.Server, variant: str, root: Path) -> float | None:
    low, high = INSTRUCTION_REQUESTS
    script = str(h.WORKERS / "bench_transport.py")
    counts = [
        h.callgrind_count([str(PYTHON), script, json.dumps(cpu_spec(server, variant, n))], root)
        for n in (low, high)
    ]
    if counts[0] is None or counts[1] is None:
        return None
    return (counts[1] - counts[0]) / (high - low)


def report(
    title: str, unit: str, values: dict[str, list[float]], higher: bool, digits: int = 0
) -> None:
    h.report(title, unit, values, LABELS, RATIOS, higher, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a git ref whose default transport is compared too")
    parser.add_argument("--head", default=str(h.REPO), help="a source tree or a git ref")
    parser.add_argument("--rounds", type=int, default=12, help="CPU rounds (default 12)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests a round")
    parser.add_argument("--e2e-reps", type=int, default=7, help="end-to-end rounds (default 7)")
    parser.add_argument("--events", type=int, default=100_000, help="events an e2e run")
    parser.add_argument("--no-e2e", action="store_true", help="only the CPU per request")
    parser.add_argument("--instructions", action="store_true", help="callgrind, per request")
    args = parser.parse_args()
    print(f"command: python benchmarks/transport.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {h.machine_line()}")
    with contextlib.ExitStack() as stack:
        roots: dict[str, Path] = {}

        def root_of(variant: str) -> Path:
            return roots[VARIANTS[variant][0]]

        for version, spec in (("head", args.head), ("base", args.base)):
            if spec is not None:
                roots[version], what = stack.enter_context(h.source_tree(spec))
                print(f"{version}: {what}")
        # the server is the head's, in its own process, the same for every variant
        server = stack.enter_context(h.Server(PYTHON, root=roots["head"]))
        names = [v for v in VARIANTS if VARIANTS[v][0] in roots]
        cpu = h.alternate(
            "cpu", args.rounds, names, lambda v: cpu_round(server, v, root_of(v), args.requests)
        )
        e2e = h.alternate(
            "e2e",
            0 if args.no_e2e else args.e2e_reps,
            names,
            lambda v: e2e_round(server, v, root_of(v), args.events),
        )
        counted: dict[str, list[float]] = {}
        for name in cpu if args.instructions else ():
            h.log(f"[instructions] {name}")
            count = instructions_per_request(server, name, root_of(name))
            counted[name] = [] if count is None else [count]
    print(f"\nCPU: {args.rounds} rounds of {args.requests} requests after {WARMUP} warm-up ones")
    report("CPU per request", "CPU µs a request", h.samples(cpu, "cpu_us"), higher=False)
    made = h.samples(cpu, "made_ms")
    report("Making the transport and its client", "ms", made, higher=False, digits=2)
    if not args.no_e2e:
        print(f"\nend to end: {args.e2e_reps} rounds of {args.events:,} events")
        report("End-to-end throughput", "events/s", h.samples(e2e, "events_per_s"), higher=True)
        per_event = h.samples(e2e, "cpu_s", 1e9 / args.events)
        report("CPU per event, end to end (the whole worker process)", "CPU ns", per_event, False)
    if args.instructions:
        low, high = INSTRUCTION_REQUESTS
        title = f"Instructions per request (callgrind: {high} requests less {low}, ÷ {high - low})"
        report(title, "instructions", counted, higher=False)


if __name__ == "__main__":
    main()
