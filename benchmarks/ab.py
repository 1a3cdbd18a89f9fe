"""A/B benchmark of the track() hot path: a git ref (base) against a source tree (head), one run.

    python benchmarks/ab.py [--base HEAD] [--head DIR|REF] [--rounds 7] [--instructions]

The base ref (and a head given as a ref) is extracted with ``git archive`` into a temporary
directory (removed afterwards); the head defaults to this working tree. Every measurement is a
fresh ``python -c`` child with ``PYTHONPATH`` set to that version's root, run alternately base,
head, base, head... Only the public API (``whisperr.AsyncClient``) is used, so private rewrites
do not break it.

``--instructions`` also counts the instructions of a capture-only ``track()``, and of one with
(mock) delivery, under valgrind's callgrind (the marginal count between 20,000 and 60,000 calls,
each run in a fresh process): unlike time, the count repeats on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, callgrind_count, imported_from, machine_line, source_tree, version_env

CHILD = r"""
import asyncio, json, logging, sys, time
import httpx, whisperr
logging.getLogger("whisperr").setLevel(logging.CRITICAL)
mode = sys.argv[1]
PROPS = {"amount_cents": 4900}

def handler(request):
    n = request.content.count(b'"$message_id"')
    return httpx.Response(202, json={"accepted": n, "rejected": 0})

async def capture(n, props, ctx):
    client = whisperr.AsyncClient(api_key="wrk_bench", base_url="http://127.0.0.1:9",
                                  max_queue_size=10**7, flush_interval=3600)
    for _ in range(1000):  # warm-up; no await anywhere, so the runner never runs
        client.track("user_8842", "payment_failed", props, ctx)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        client.track("user_8842", "payment_failed", props, ctx)
    elapsed = time.perf_counter_ns() - t0
    await client.aclose(timeout=0)
    return elapsed / n / 1000

async def delivery(n):
    client = whisperr.AsyncClient(api_key="wrk_bench", base_url="http://127.0.0.1:9",
                                  transport=httpx.MockTransport(handler))
    for _ in range(1000):
        client.track("user_8842", "payment_failed", PROPS)
    await client.flush()
    before = client.stats().delivered
    t0 = time.perf_counter_ns()
    for i in range(n):
        client.track("user_8842", "payment_failed", PROPS)
        if i % 100 == 99:
            await asyncio.sleep(0)
    await client.flush()
    elapsed = time.perf_counter_ns() - t0
    stats = client.stats()
    await client.aclose()
    assert stats.delivered - before == n and not stats.dropped, stats
    return elapsed / n / 1000

if mode == "probe":
    print(json.dumps({"file": whisperr.__file__}))
    sys.exit()
name, _, calls = mode.partition("@")  # "capture@20000": that many calls, for callgrind
runs = {"capture": lambda n: capture(n, PROPS, None),
        "delivery": delivery,
        "capture-slow": lambda n: capture(n, None, {"k": 1})}
n = int(calls) if calls else {"capture": 200_000, "delivery": 100_000}.get(name, 200_000)
print(json.dumps({"file": whisperr.__file__, "us": asyncio.run(runs[name](n))}))
"""
MEASUREMENTS = {
    "capture": "(a) track(), capture only, 200k calls",
    "delivery": "(b) track() + delivery (mock), 100k + flush",
    "capture-slow": "(c) track(None, context), capture only",
}


def run_child(root: Path, mode: str) -> dict[str, object]:
    """One fresh process; a dict with "file" (and "us"), or "error"."""
    try:  # cwd elsewhere: `python -c` puts the cwd first on sys.path
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode],
            capture_output=True, text=True, env=version_env(root), cwd=tempfile.gettempdir(),
            timeout=300,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {"error": lines[-1]}
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if not imported_from(str(found["file"]), root):
        return {"error": f"imported {found['file']}, not a file under {root}"}
    return found


COUNTED = {"capture": "a capture-only track()", "delivery": "a track() with delivery (mock)"}


def instructions(root: Path, mode: str, calls: int) -> int | None:
    """What callgrind counts for a process making ``calls`` tracks of ``mode``; None if not."""
    return callgrind_count([sys.executable, "-c", CHILD, f"{mode}@{calls}"], root)


def count_instructions(roots: dict[str, Path]) -> None:
    low, high = 20_000, 60_000
    for mode, what in COUNTED.items():
        per_call: dict[str, float] = {}
        for name, root in roots.items():
            counts = [instructions(root, mode, calls) for calls in (low, high)]
            if None in counts:
                print(f"{name}: no instruction count (is valgrind installed?)")
                return
            per_call[name] = (counts[1] - counts[0]) / (high - low)  # type: ignore[operator]
        base, head = per_call["base"], per_call["head"]
        print(
            f"\ninstructions {what} (callgrind, {low:,} to {high:,} calls): base {base:,.0f}, "
            f"head {head:,.0f}, head/base {head / base:.3f} ({verdict(head / base)})"
        )


def verdict(ratio: float) -> str:
    if abs(ratio - 1) <= 0.05:
        return "WITHIN 5%"
    return f"{'SLOWER' if ratio > 1 else 'FASTER'} BY {abs(ratio - 1) * 100:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="a git ref of this repo (default: HEAD)")
    parser.add_argument(
        "--head", default=str(REPO), help="a source tree or a git ref (default: this work tree)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions with callgrind"
    )
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    with contextlib.ExitStack() as stack:
        roots: dict[str, Path] = {}
        for name, spec in (("base", args.base), ("head", args.head)):
            root, what = stack.enter_context(source_tree(spec))
            print(f"{name}: {what}")
            probe = run_child(root, "probe")
            if "error" in probe:
                print(f"{name}: CANNOT IMPORT whisperr from {root}: {probe['error']}")
            else:
                print(f"{name}: imports {probe['file']}")
                roots[name] = root
        samples: dict[tuple[str, str], list[float]] = {}
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd}/{args.rounds} ...", flush=True)
            for mode in MEASUREMENTS:
                for name, root in roots.items():  # base, head, base, head...
                    got = run_child(root, mode)
                    if "error" in got:
                        print(f"{name} {mode} round {rnd} FAILED: {got['error']}")
                    else:
                        samples.setdefault((mode, name), []).append(float(str(got["us"])))
        if args.instructions and len(roots) == 2:
            count_instructions(roots)
    print(f"\n{'measurement':<45} | base µs | head µs | head/base | {'verdict':<15} | samples")
    for mode, label in MEASUREMENTS.items():
        b, h = samples.get((mode, "base"), []), samples.get((mode, "head"), [])
        mb, mh = (statistics.median(v) if v else None for v in (b, h))
        ratio = f"{mh / mb:9.3f}" if mb and mh else f"{'-':>9}"
        cells = [f"{m:7.3f}" if m else f"{'-':>7}" for m in (mb, mh)]
        note = verdict(mh / mb) if mb and mh else "n/a"
        shown = " ".join(f"{x:.3f}" for x in b) + " / " + " ".join(f"{x:.3f}" for x in h)
        print(f"{label:<45} | {cells[0]} | {cells[1]} | {ratio} | {note:<15} | {shown}")


if __name__ == "__main__":
    main()
