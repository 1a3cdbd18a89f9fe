"""A/B benchmark of the track() hot path: a git ref (base) against a source tree (head), one run.

    python benchmarks/ab.py [--base HEAD] [--head DIR] [--rounds 7] [--instructions]

The base ref is extracted with ``git archive`` into a temporary directory (removed afterwards);
the head defaults to this working tree. Every measurement is a fresh ``python -c`` child with
``PYTHONPATH`` set to that version's root, run alternately base, head, base, head... Only the
public API (``whisperr.AsyncClient``) is used, so private rewrites do not break it.

``--instructions`` also counts the instructions of a capture-only ``track()`` under valgrind's
callgrind (the marginal count between 20,000 and 60,000 calls, each run in a fresh process):
unlike time, the count repeats on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
if mode.startswith("capture@"):
    print(json.dumps({"file": whisperr.__file__,
                      "us": asyncio.run(capture(int(mode[8:]), PROPS, None))}))
    sys.exit()
coro = {"capture": lambda: capture(200_000, PROPS, None),
        "delivery": lambda: delivery(100_000),
        "capture-slow": lambda: capture(200_000, None, {"k": 1})}[mode]()
print(json.dumps({"file": whisperr.__file__, "us": asyncio.run(coro)}))
"""
MEASUREMENTS = {
    "capture": "(a) track(), capture only, 200k calls",
    "delivery": "(b) track() + delivery (mock), 100k + flush",
    "capture-slow": "(c) track(None, context), capture only",
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def describe(tree: Path, ref: str = "HEAD", check_dirty: bool = True) -> str:
    sha = git(tree, "rev-parse", f"{ref}^{{commit}}")
    # benchmarks/ is left out: it is not what is measured (and this script may be new there)
    dirty = check_dirty and git(tree, "status", "--porcelain", "--", ".", ":!benchmarks")
    return sha + (" + uncommitted changes" if dirty else "")


def machine_line() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.python_implementation()} {platform.python_version()} | {platform.system()} "
        f"{platform.machine()} | {os.cpu_count()} CPUs | {cpu}"
    )


def run_child(root: Path, mode: str) -> dict[str, object]:
    """One fresh process; a dict with "file" (and "us"), or "error"."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    try:  # cwd elsewhere: `python -c` puts the cwd first on sys.path
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode],
            capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=300,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 300 s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {"error": lines[-1]}
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(str(found["file"])).resolve().is_relative_to(root.resolve()):
        return {"error": f"imported {found['file']}, not a file under {root}"}
    return found


def instructions(root: Path, calls: int) -> int | None:
    """What callgrind counts for a process making ``calls`` capture-only tracks; None if not."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    try:
        done = subprocess.run(
            [*command, sys.executable, "-c", CHILD, f"capture@{calls}"],
            capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=1200,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    collected = [line for line in done.stderr.splitlines() if "Collected" in line]
    return int(collected[-1].split()[-1]) if collected else None


def count_instructions(roots: dict[str, Path]) -> None:
    low, high = 20_000, 60_000
    per_call: dict[str, float] = {}
    for name, root in roots.items():
        counts = [instructions(root, calls) for calls in (low, high)]
        if None in counts:
            print(f"{name}: no instruction count (is valgrind installed?)")
            return
        per_call[name] = (counts[1] - counts[0]) / (high - low)  # type: ignore[operator]
    base, head = per_call["base"], per_call["head"]
    print(
        f"\ninstructions a capture-only track() (callgrind, {low:,} to {high:,} calls): "
        f"base {base:,.0f}, head {head:,.0f}, head/base {head / base:.3f} ({verdict(head / base)})"
    )


def verdict(ratio: float) -> str:
    if abs(ratio - 1) <= 0.05:
        return "WITHIN 5%"
    return f"{'SLOWER' if ratio > 1 else 'FASTER'} BY {abs(ratio - 1) * 100:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="a git ref of this repo (default: HEAD)")
    parser.add_argument("--head", type=Path, default=REPO, help="a source tree (default: repo)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions with callgrind"
    )
    args = parser.parse_args()
    head: Path = args.head.resolve()
    try:
        base_sha = describe(REPO, args.base, check_dirty=False)
    except subprocess.CalledProcessError as exc:
        parser.error(f"--base {args.base}: {exc.stderr.strip()}")
    print(f"machine: {machine_line()}")
    print(f"base: {args.base} = {base_sha}")
    try:
        print(f"head: {head} = {describe(head)}")
    except subprocess.CalledProcessError:
        print(f"head: {head} (not a git work tree)")
    with tempfile.TemporaryDirectory(prefix="whisperr-ab-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", base_sha], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        roots = {"base": Path(tmp), "head": head}
        for name, root in list(roots.items()):
            if (root / "src" / "whisperr").is_dir():
                roots[name] = root = root / "src"
            probe = run_child(root, "probe")
            if "error" in probe:
                print(f"{name}: CANNOT IMPORT whisperr from {root}: {probe['error']}")
                del roots[name]
            else:
                print(f"{name}: imports {probe['file']}")
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
