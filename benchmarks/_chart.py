"""Draw results.png from results.json: one panel per benchmark, median bars, min-max whiskers.

Run by run.py with an interpreter that has matplotlib: ``python _chart.py results.json out.png``.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TITLES = {
    "track": "a. track() cost\nµs per call (lower is better)",
    "e2e": "b. end-to-end throughput\nevents/s (higher is better)",
    "latency": "c. throughput, 50 ms latency\nevents/s (higher is better)",
    "memory": "d. memory while unreachable\nbytes per queued event (lower is better)",
    "faults": "e. under faults: time to settle\nseconds (lower is better)",
}
COLORS = {"ours": "#2a7ae2", "official": "#888888", "segment": "#52b788", "posthog": "#f4a261"}


def main(src: str, dst: str) -> None:
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    summary = data["summary"]
    benches = [b for b in TITLES if b in summary]
    cols = min(3, len(benches))
    rows_n = (len(benches) + cols) // cols  # one spare cell for the notes
    fig, grid = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 4.0 * rows_n), squeeze=False)
    axes = list(grid.flat)
    for ax, bench in zip(axes, benches, strict=False):
        rows = summary[bench]
        sdks = list(rows)
        meds = [rows[s]["median"] or 0.0 for s in sdks]
        lows, highs = [], []
        for sdk, med in zip(sdks, meds, strict=True):
            low, high = rows[sdk]["min"], rows[sdk]["max"]
            lows.append(0.0 if low is None else med - low)
            highs.append(0.0 if high is None else high - med)
        bars = ax.bar(
            sdks,
            meds,
            yerr=[lows, highs],
            capsize=4,
            color=[COLORS.get(s, "#999999") for s in sdks],
        )
        for bar, sdk in zip(bars, sdks, strict=True):
            ratio = rows[sdk]["ratio"]
            label = "n/a" if rows[sdk]["median"] is None else (f"{ratio:.2f}x" if ratio else "")
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, rows[sdk]["max"] or bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_title(TITLES[bench], fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        ax.margins(y=0.15)
    for ax in axes[len(benches) :]:
        ax.axis("off")
    notes = [f"{sdk} {version}" for sdk, version in data["versions"].items()]
    notes += ["", "ours: " + data.get("commit", "?"), "", "events per run:"]
    notes += [f"  {b}: {n:,}" for b, n in data["sizes"].items() if b in summary]
    axes[-1].text(0.0, 0.95, "\n".join(notes), va="top", fontsize=9, family="monospace")
    fig.suptitle(
        "whisperr benchmarks: medians (labels: ratio to official, same run)\n" + data["machine"],
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
