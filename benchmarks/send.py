"""send(): one event delivered now and waited for, next to PostHog's immediate capture, one run.

    python benchmarks/send.py [--rounds 7] [--sends 2000] [--warmup 200] [--senders 16]
                              [--per-sender 125] [--variants ours,ours-sync,...]

Variants (``workers/bench_send.py``, each round a fresh worker process per variant):

- ``ours``: ``await whisperr.AsyncClient.send(...)``, to ``POST /v1/events/track``;
- ``ours-sync``: the blocking ``whisperr.Client.send(...)``;
- ``posthog-async``: ``await posthog.AsyncPosthog(...).capture_immediate(...)``;
- ``posthog-sync``: ``posthog.Posthog(..., sync_mode=True).capture(...)``, which sends the event
  before it returns;
- ``ours-post``: only the request a send makes (``whisperr._transport.post()`` over the pool
  of ``Delivery.open()``), without ``send()``'s checks, hand-off to the runner and receipt;
- ``http.client``: the standard library's keep-alive connection POSTing the same kind of event
  to ``/v1/events/track``: the floor, what the server and the loopback round trip cost.

One server, ``python -m whisperr.server --api-key ...`` in its own process on 127.0.0.1, with
its validation on, as the real API checks every event; posthog is pointed at its lenient
``/_lenient`` endpoint (it POSTs ``/_lenient/batch/``), which parses the JSON and counts. Each
worker sends ``--warmup`` events, then ``--sends`` sequential ones, each timed (median, p99),
then ``--senders`` tasks (the async variants) or threads (the blocking ones) on one client,
each sending ``--per-sender`` in a loop after 5 warm-up sends: sends per second and CPU per
send (the worker's ``time.process_time``, not the server's). A round counts only if no send
failed and the server then holds every event sent (ours, ours-post and http.client: that many
distinct stored events; posthog: the lenient count). Rounds rotate the order of the variants.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

KEY = "wrk_bench"
WARMUP_PER_SENDER = 5
BUDGET = 120.0  # seconds the concurrent part of one worker may take
VARIANTS = ("ours", "ours-sync", "posthog-async", "posthog-sync", "ours-post", "http.client")
POSTHOG = {"posthog-async", "posthog-sync"}
LABELS = {
    "ours": "ours: `await AsyncClient.send()`, tasks",
    "ours-sync": "ours-sync: `Client.send()`, threads",
    "posthog-async": "posthog-async: `await AsyncPosthog.capture_immediate()`, tasks",
    "posthog-sync": "posthog-sync: `Posthog(sync_mode=True).capture()`, threads",
    "ours-post": "ours-post: the request alone, `post()` over our pool, tasks",
    "http.client": "http.client: stdlib keep-alive POST (the floor), threads",
}
RATIOS = (
    ("ours", "posthog-async"),
    ("ours-sync", "posthog-sync"),
    ("ours", "posthog-sync"),
    ("ours", "ours-post"),
    ("ours-post", "http.client"),
    ("ours", "http.client"),
    ("ours-sync", "http.client"),
    ("posthog-async", "http.client"),
    ("posthog-sync", "http.client"),
)
# result field, title, unit, higher is better, scale, digits
METRICS = (
    ("lat_median_us", "Sequential latency, median", "µs a send", False, 1.0, 0),
    ("lat_p99_us", "Sequential latency, p99", "µs a send", False, 1.0, 0),
    ("seq_cpu_us", "CPU per sequential send (the worker process)", "CPU µs", False, 1.0, 0),
    ("rps", "Concurrent senders: sends per second", "sends/s", True, 1.0, 0),
    ("conc_cpu_us", "CPU per concurrent send (the worker process)", "CPU µs", False, 1.0, 0),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--sends", type=int, default=2000, help="timed sequential sends a round")
    p.add_argument("--warmup", type=int, default=200, help="sequential warm-up sends")
    p.add_argument("--senders", type=int, default=16, help="concurrent tasks or threads")
    p.add_argument("--per-sender", type=int, default=125, help="sends each concurrent sender")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the variants")
    p.add_argument("--venv-dir", type=Path, help=f"venv cache (default {h.default_cache_dir()})")
    p.add_argument("--ours-python", help="interpreter where `import whisperr` is this project")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"unknown variant: {', '.join(sorted(unknown))}")
    if args.sends < 2:
        p.error("--sends must be at least 2 (for a p99)")
    args.venv_dir = (args.venv_dir or h.default_cache_dir()).expanduser().resolve()
    return args


def expected(args: argparse.Namespace) -> int:
    return args.warmup + args.sends + args.senders * (WARMUP_PER_SENDER + args.per_sender)


def measure(
    server: h.Server, python: Path, variant: str, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {
        "variant": variant,
        "url": server.url,
        "key": KEY,
        "n": args.sends,
        "warmup": args.warmup,
        "senders": args.senders,
        "per_sender": args.per_sender,
        "warmup_per_sender": WARMUP_PER_SENDER,
        "budget": BUDGET,
    }
    server.reset()
    result = h.run_worker(python, "bench_send.py", spec, BUDGET + 180)
    counts = server.counts()
    server.reset()
    want = expected(args)
    arrived = counts["lenient"] if variant in POSTHOG else counts["unique"]
    if "error" in result:
        pass
    elif result["failed"]:
        result["error"] = f"{result['failed']} sends failed, the first: {result['first_failure']}"
    elif arrived != want or (variant not in POSTHOG and counts["stored"] != want):
        result["error"] = f"the server holds {arrived:,} of {want:,} events ({counts})"
    discarded = result.get("discarded_connections")
    extra = "" if discarded is None else f", {discarded} pooled connections discarded"
    if variant in ("ours", "ours-sync"):
        extra += f", {result.get('retried', '?')} sends retried"
    if "error" not in result:
        h.log(
            f"  {variant:<13} median {result['lat_median_us']:,.0f} µs, "
            f"p99 {result['lat_p99_us']:,.0f} µs, max {result['lat_max_us']:,.0f} µs, "
            f"{result['rps']:,.0f} sends/s{extra}"
        )
    return result


def summary(medians: dict[str, dict[str, float]], variants: list[str], senders: int) -> None:
    """One table of every variant's medians, and one of the ratios, for the README."""
    print("\n## Summary: medians over the rounds\n")
    print("| variant | latency median, µs | latency p99, µs | CPU µs a sequential send |", end="")
    print(f" sends/s, {senders} concurrent | CPU µs a concurrent send |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        cells = [medians[field].get(name) for field, *_ in METRICS]
        shown = ["n/a" if c is None else f"{c:,.0f}" for c in cells]
        print(f"| {LABELS[name]} | " + " | ".join(shown) + " |")
    print("\n## Summary: ratios of the medians (latency and CPU: lower is better; sends/s: higher)")
    print("\n| ratio | latency median | latency p99 | CPU a sequential send | sends/s |", end="")
    print(" CPU a concurrent send |")
    print("|---|---:|---:|---:|---:|---:|")
    for a, b in RATIOS:
        if a not in variants or b not in variants:
            continue
        cells = []
        for field, *_ in METRICS:
            x, y = medians[field].get(a), medians[field].get(b)
            cells.append("n/a" if x is None or not y else f"{x / y:.2f}x")
        print(f"| {a} ÷ {b} | " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    print(f"command: python benchmarks/send.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {h.machine_line()}")
    ours = h.ours_python(args.ours_python)
    python = dict.fromkeys(args.variants, ours)
    if POSTHOG & set(args.variants):
        has_posthog = importlib.util.find_spec("posthog") is not None
        others = Path(sys.executable) if has_posthog else h.others_python(args.venv_dir)
        python.update(dict.fromkeys(POSTHOG & set(args.variants), others))
        print(f"posthog: {h.package_version(others, 'posthog')} ({others})")
    print(f"ours: whisperr-async {h.package_version(ours, 'whisperr-async')}, {h.git_commit()}")
    print(
        f"{args.rounds} rounds; a worker: {args.warmup} warm-up sends, {args.sends:,} timed "
        f"sequential sends, then {args.senders} senders x ({WARMUP_PER_SENDER} warm-up + "
        f"{args.per_sender}) = {args.senders * args.per_sender:,} timed concurrent sends"
    )
    with h.Server(ours, "--api-key", KEY, validate=True) as server:
        results = h.alternate(
            "send", args.rounds, args.variants, lambda v: measure(server, python[v], v, args)
        )
    medians: dict[str, dict[str, float]] = {}
    for field, title, unit, higher, scale, digits in METRICS:
        values = h.samples(results, field, scale)
        medians[field] = h.report(title, unit, values, LABELS, RATIOS, higher, digits)
    worst = {name: [r["lat_max_us"] for r in runs] for name, runs in results.items()}
    h.report("Sequential latency, the slowest send", "µs", worst, LABELS, (), False)
    discarded = [r["discarded_connections"] for r in results.get("posthog-sync", [])]
    if discarded:
        print(f"\nposthog-sync: pooled connections urllib3 discarded, per round: {discarded}")
    summary(medians, args.variants, args.senders)


if __name__ == "__main__":
    main()
