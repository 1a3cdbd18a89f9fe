"""Benchmark this SDK against the official whisperr 0.2.1, segment-analytics-python and posthog.

    python benchmarks/run.py [--events N] [--quick] [--chart] [--venv-dir DIR]

Everything is set up here: cached venvs for the other SDKs (outside the repo), local servers in
their own processes on 127.0.0.1, one worker subprocess per measurement, medians over the
repetitions, and benchmarks/results/{results.md,results.json,results.png}. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

FAULT_MIX = "503=0.2,429:1=0.1,close=0.1,lost_ack=0.1"
LATENCY = 0.05
SDKS = ("ours", "official", "segment", "posthog")
LENIENT = {"segment", "posthog"}  # their own protocols, counted by the server's /_lenient/*
SCRIPTS = {sdk: f"bench_{sdk}.py" for sdk in SDKS}
BENCHES = ("track", "e2e", "latency", "memory", "faults")
CHEAP = {"track", "memory"}  # a few seconds per run: repeated 5 times by default
# Seconds a worker may wait for delivery (it then reports that it did not finish); the
# subprocess itself is killed WORKER_SLACK seconds after that.
BUDGET = {"track": 120.0, "e2e": 120.0, "latency": 120.0, "memory": 60.0, "faults": 240.0}
WORKER_SLACK = 90.0

# bench -> (result field, unit, higher is better)
METRIC = {
    "track": ("us_per_call", "µs per track() call", False),
    "e2e": ("events_per_s", "events/s end to end", True),
    "latency": ("events_per_s", "events/s, 50 ms server latency", True),
    "memory": ("bytes_per_event", "bytes per queued event", False),
    "faults": ("seconds", "seconds until every event settled, under faults", False),
}
TITLE = {
    "track": "a. track() cost",
    "e2e": "b. end-to-end throughput",
    "latency": "c. throughput, 50 ms latency",
    "memory": "d. memory while unreachable",
    "faults": "e. delivery under faults",
}
# bench -> (target text, goal for ours ÷ official); the direction comes from METRIC
TARGETS: dict[str, tuple[str, float]] = {
    "track": ("≤ 0.20x official (1/5)", 0.20),
    "e2e": ("≥ 4x official", 4.0),
    "latency": ("≥ 10x official", 10.0),
    "memory": ("≤ 0.33x official (1/3)", 1 / 3),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, help="events for b. and calls for a. (default 100000)")
    p.add_argument("--latency-events", type=int, help="events for c. (default 20000)")
    p.add_argument("--memory-events", type=int, help="events for d. (default 50000)")
    p.add_argument("--fault-events", type=int, help="events for e. (default 10000)")
    p.add_argument("--reps", type=int, help="repetitions (default 5 for a. and d., 3 for others)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition: a smoke run")
    p.add_argument(
        "--benchmarks", default=",".join(BENCHES), help="comma list of " + ", ".join(BENCHES)
    )
    p.add_argument("--sdks", default=",".join(SDKS), help="comma list; official is the baseline")
    p.add_argument("--seed", type=int, default=7, help="fault-mix seed (plus the repetition)")
    p.add_argument("--venv-dir", type=Path, help=f"venv cache (default {h.default_cache_dir()})")
    p.add_argument("--results-dir", type=Path, help="default benchmarks/results (--quick: cache)")
    p.add_argument(
        "--chart", action="store_true", help="install matplotlib (cached venv) if needed"
    )
    p.add_argument("--ours-python", help="interpreter where `import whisperr` is this project")
    args = p.parse_args(argv)
    quick = args.quick
    args.events = args.events or (20_000 if quick else 100_000)
    args.latency_events = args.latency_events or (5_000 if quick else 20_000)
    args.memory_events = args.memory_events or (10_000 if quick else 50_000)
    args.fault_events = args.fault_events or (2_000 if quick else 10_000)
    args.rep_count = {b: args.reps or (1 if quick else 5 if b in CHEAP else 3) for b in BENCHES}
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    args.sdks = [s for s in args.sdks.split(",") if s]
    unknown = (set(args.benchmarks) - set(BENCHES)) | (set(args.sdks) - set(SDKS))
    if unknown:
        p.error(f"unknown benchmark or SDK: {', '.join(sorted(unknown))}")
    args.venv_dir = (args.venv_dir or h.default_cache_dir()).expanduser().resolve()
    if args.venv_dir.is_relative_to(h.REPO):
        p.error("--venv-dir must be outside the repository")
    if args.results_dir is None:
        args.results_dir = args.venv_dir / "quick-results" if quick else h.BENCH_DIR / "results"
    return args


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs: list[dict[str, Any]] = []
        self.python: dict[str, Path] = {}
        self.versions: dict[str, str] = {}
        self.commit = h.git_commit()

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        self.ours = h.ours_python(a.ours_python)
        self.python["ours"] = self.ours
        self.versions["ours"] = h.package_version(self.ours, "whisperr-async")
        if "official" in a.sdks:
            self.python["official"] = h.official_python(a.venv_dir)
            self.versions["official"] = h.package_version(self.python["official"], "whisperr")
        if LENIENT & set(a.sdks):
            others = h.others_python(a.venv_dir)
            self.python["segment"] = self.python["posthog"] = others
            self.versions["segment"] = h.package_version(others, "segment-analytics-python")
            self.versions["posthog"] = h.package_version(others, "posthog")
        for sdk in a.sdks:
            h.log(f"[setup] {sdk:<9} {self.versions[sdk]:<10} {self.python[sdk]}")

    def size(self, bench: str) -> int:
        a = self.args
        return {
            "track": a.events,
            "e2e": a.events,
            "latency": a.latency_events,
            "memory": a.memory_events,
            "faults": a.fault_events,
        }[bench]

    # -- running ----------------------------------------------------------------------------

    def order(self, rep: int) -> list[str]:
        """Rotate the SDK order per repetition, so that none always runs first on a warm box."""
        sdks = self.args.sdks
        k = rep % len(sdks)
        return sdks[k:] + sdks[:k]

    def reps(self, bench: str) -> range:
        return range(self.args.rep_count[bench])

    def run_all(self) -> None:
        for bench in self.args.benchmarks:
            reps = self.args.rep_count[bench]
            h.log(f"[{bench}] {TITLE[bench]}: n={self.size(bench):,}, reps={reps}")
            if bench == "memory":
                self.run_memory()
            elif bench == "faults":
                self.run_faults()
            else:
                extra = ("--latency", str(LATENCY)) if bench == "latency" else ()
                with h.Server(self.ours, *extra) as server:
                    for rep in self.reps(bench):
                        for sdk in self.order(rep):
                            self.measure(bench, sdk, rep, server)

    def run_memory(self) -> None:
        for rep in self.reps("memory"):
            for sdk in self.order(rep):
                with h.closed_port() as url:
                    self.record("memory", sdk, rep, self.work("memory", sdk, url), None)

    def run_faults(self) -> None:
        for rep in self.reps("faults"):
            seed = self.args.seed + rep  # same fault sequence for every SDK within a repetition
            for sdk in self.order(rep):
                faults = ("--fault-mix", FAULT_MIX, "--seed", str(seed))
                with h.Server(self.ours, *faults) as server:
                    self.measure("faults", sdk, rep, server)

    def work(self, bench: str, sdk: str, url: str) -> dict[str, Any]:
        spec = {"bench": bench, "n": self.size(bench), "url": url, "budget": BUDGET[bench]}
        return h.run_worker(self.python[sdk], SCRIPTS[sdk], spec, BUDGET[bench] + WORKER_SLACK)

    def measure(self, bench: str, sdk: str, rep: int, server: h.Server) -> None:
        server.reset()
        result = self.work(bench, sdk, server.url)
        try:
            counts = server.counts()
        except OSError as exc:
            counts = {"error": str(exc)}
        server.reset()
        self.record(bench, sdk, rep, result, counts)

    def record(
        self, bench: str, sdk: str, rep: int, result: dict[str, Any], counts: dict[str, Any] | None
    ) -> None:
        run = {"bench": bench, "sdk": sdk, "rep": rep, **result}
        sent = result.get("n_sent")
        if counts is not None and "error" not in counts:
            arrived = counts["lenient"] if sdk in LENIENT else counts["stored"]
            run["server_count"] = arrived
            run["server_unique"] = None if sdk in LENIENT else counts["unique"]
            run["all_arrived"] = sent is not None and arrived == sent
        field = METRIC[bench][0]
        # A throughput counts only if every event arrived; under faults the time counts once the
        # SDK returned (whether it stored each event exactly once is reported on its own).
        complete = {"track": True, "memory": True, "faults": bool(result.get("returned"))}
        run["valid"] = (
            "error" not in result
            and result.get(field) is not None
            and complete.get(bench, bool(run.get("all_arrived")))
        )
        self.runs.append(run)
        h.log(f"  rep {rep + 1} {sdk:<9} {describe(run)}")

    # -- summary ----------------------------------------------------------------------------

    def values(self, bench: str, sdk: str) -> list[float]:
        field = METRIC[bench][0]
        return [
            r[field] for r in self.runs if r["bench"] == bench and r["sdk"] == sdk and r["valid"]
        ]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for bench in self.args.benchmarks:
            rows: dict[str, Any] = {}
            base = h.median(self.values(bench, "official"))
            for sdk in self.args.sdks:
                vals = self.values(bench, sdk)
                med = h.median(vals)
                runs = [r for r in self.runs if r["bench"] == bench and r["sdk"] == sdk]
                rows[sdk] = {
                    "median": med,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None,
                    "valid_runs": len(vals),
                    "runs": len(runs),
                    "ratio": med / base if med is not None and base else None,
                }
                if bench == "faults":
                    rows[sdk].update(fault_summary(sdk, runs, self.size(bench)))
            out[bench] = rows
        return out


def fault_summary(sdk: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    counts = [r.get("server_count") for r in runs]
    returned = [bool(r.get("returned")) for r in runs]
    if sdk in LENIENT:
        exactly = None  # the lenient endpoint counts messages; it cannot tell duplicates apart
    else:
        stored = all(r.get("server_count") == n and r.get("server_unique") == n for r in runs)
        exactly = stored and all(returned) and bool(runs)
    return {"counts": counts, "returned_all": all(returned), "exactly_once": exactly}


def describe(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"ERROR {run['error']}"
    bench = run["bench"]
    parts = []
    if bench == "track":
        parts.append(f"{run['us_per_call']:.2f} µs/call")
    elif bench == "memory":
        parts.append(f"{run['bytes_per_event']:,.0f} B/event")
    else:
        parts.append(
            f"{run['seconds']:.2f} s" + ("" if run.get("returned") else " (did not finish)")
        )
        if run.get("events_per_s"):
            parts.append(f"{run['events_per_s']:,.0f} ev/s")
    if "server_count" in run:
        parts.append(f"server has {run['server_count']:,}/{run.get('n_sent', 0):,}")
    return ", ".join(parts)


# -- rendering -------------------------------------------------------------------------------


def fmt(value: float | None, bench: str) -> str:
    if value is None:
        return "n/a"
    if bench == "track":
        return f"{value:.2f}"
    if bench == "faults":
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def target_rows(summary: dict[str, Any], n_faults: int) -> list[tuple[str, str, str, str]]:
    """(benchmark, target, ours ÷ official, verdict)."""
    rows = []
    for bench, (text, goal) in TARGETS.items():
        if bench not in summary:
            continue
        ratio = summary[bench].get("ours", {}).get("ratio")
        if ratio is None:
            rows.append((TITLE[bench], text, "n/a", "not measured"))
            continue
        higher = METRIC[bench][2]
        if (ratio >= goal) if higher else (ratio <= goal):
            verdict = "**met**"
        else:
            gap = goal / ratio if higher else ratio / goal
            verdict = f"**missed**: ours must get {gap:.1f}x better to meet it"
        rows.append((TITLE[bench], text, fmt_ratio(ratio), verdict))
    if "faults" in summary and "ours" in summary["faults"]:
        f = summary["faults"]["ours"]
        counts = ", ".join(str(c) for c in f["counts"])
        verdict = "**met**" if f["exactly_once"] else "**missed**"
        rows.append(
            (
                TITLE["faults"],
                "every event stored exactly once",
                f"stored {counts} of {n_faults}",
                verdict,
            )
        )
    return rows


def markdown(suite: Suite, summary: dict[str, Any], command: str, machine: str) -> str:
    a = suite.args
    sdks = a.sdks
    lines = [
        "# whisperr benchmark results",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine}",
        "- SDKs: " + ", ".join(f"{s} {suite.versions.get(s, '?')}" for s in sdks),
        f"- Sizes: a. {a.events:,} calls; b. {a.events:,} events; c. {a.latency_events:,} events; "
        f"d. {a.memory_events:,} events; e. {a.fault_events:,} events.",
        "- Repetitions: "
        + ", ".join(f"{b} {a.rep_count[b]}" for b in a.benchmarks)
        + "; every one in a fresh worker process, SDK order rotated per repetition; medians below.",
        f"- This SDK: {suite.commit}",
        f"- Faults: `{FAULT_MIX}`, seed {a.seed} + repetition, a fresh server per run.",
        "",
        "## Medians",
        "",
        "| benchmark | unit | " + " | ".join(sdks) + " |",
        "|---|---|" + "---:|" * len(sdks),
    ]
    for bench, rows in summary.items():
        _, unit, higher = METRIC[bench]
        unit += " (higher is better)" if higher else " (lower is better)"
        cells = []
        for sdk in sdks:
            row = rows[sdk]
            cell = fmt(row["median"], bench)
            if row["valid_runs"] < row["runs"]:
                cell += f" ({row['valid_runs']}/{row['runs']} runs complete)"
            cells.append(cell)
        lines.append(f"| {TITLE[bench]} | {unit} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ratios: each SDK's median ÷ official's median (same run)",
        "",
        "For µs/call, bytes and seconds below 1x is better; for events/s above 1x is better.",
        "",
        "| benchmark | " + " | ".join(sdks) + " |",
        "|---|" + "---:|" * len(sdks),
    ]
    for bench, rows in summary.items():
        lines.append(
            f"| {TITLE[bench]} | " + " | ".join(fmt_ratio(rows[s]["ratio"]) for s in sdks) + " |"
        )
    if "faults" in summary:
        lines += [
            "",
            "## Delivery under faults",
            "",
            "| SDK | stored / tracked per run | returned | exactly once |",
            "|---|---|---|---|",
        ]
        for sdk in sdks:
            f = summary["faults"][sdk]
            counts = ", ".join("?" if c is None else f"{c:,}" for c in f["counts"])
            if sdk in LENIENT:
                once = "n/a: the lenient endpoint only counts (more than tracked: duplicates)"
            else:
                once = "yes" if f["exactly_once"] else "no"
            returned = "yes" if f["returned_all"] else "no"
            lines.append(f"| {sdk} | {counts} / {a.fault_events:,} | {returned} | {once} |")
    lines += [
        "",
        "## Targets (ours ÷ official, same run)",
        "",
        "| benchmark | target | measured | verdict |",
    ]
    lines.append("|---|---|---|---|")
    for row in target_rows(summary, a.fault_events):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Every run", "", "| benchmark | rep | SDK | result |", "|---|---:|---|---|"]
    for run in suite.runs:
        lines.append(f"| {run['bench']} | {run['rep'] + 1} | {run['sdk']} | {describe(run)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    machine = h.machine_line()
    h.log(f"[machine] {machine}")
    suite = Suite(args)
    t0 = time.perf_counter()
    suite.setup()
    suite.run_all()
    summary = suite.summary()
    h.log(f"[done] {time.perf_counter() - t0:.0f} s")

    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(suite, summary, command.strip(), machine)
    (out / "results.md").write_text(text, encoding="utf-8")
    raw = {
        "command": command.strip(),
        "machine": machine,
        "versions": suite.versions,
        "sizes": {b: suite.size(b) for b in BENCHES},
        "reps": args.rep_count,
        "commit": suite.commit,
        "summary": summary,
        "runs": suite.runs,
        "units": {b: METRIC[b][1] for b in BENCHES},
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    print(text)
    chart = h.chart_python(args.venv_dir, install=args.chart)
    if chart is None:
        print("chart: skipped (no matplotlib here; --chart installs it in a cached venv)")
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [
                    str(chart),
                    str(h.BENCH_DIR / "_chart.py"),
                    str(out / "results.json"),
                    str(out / "results.png"),
                ],
                check=False,
                timeout=120,
                env={**os.environ, "MPLBACKEND": "Agg"},
            )
        print(f"chart: {out / 'results.png'}")
    print(f"results: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
