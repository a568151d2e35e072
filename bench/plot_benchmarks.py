"""Draw docs/benchmarks.png from bench/results/summary.json: each issue-7 figure before and after, beside
its target.

    python bench/plot_benchmarks.py [--summary bench/results/summary.json] [--out docs/benchmarks.png]

summary.json holds the measured figures (each with its date, machine and command: the benches print
them; docs/BENCHMARKS.md has the tables). A figure that was not measured is null and drawn as "not run".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=REPO / "bench" / "results" / "summary.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads(args.summary.read_text())
    panels = summary["panels"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        labels = [b["label"] for b in panel["bars"]]
        values = [b["value"] for b in panel["bars"]]
        drawn = [v if v is not None else 0 for v in values]
        colors = ["#bbbbbb" if b.get("baseline") else "#3b7dd8" for b in panel["bars"]]
        bars = ax.bar(range(len(labels)), drawn, color=colors)
        for rect, value in zip(bars, values, strict=True):
            text = "not run" if value is None else f"{value:{panel.get('fmt', '.2f')}}"
            ax.annotate(text, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        if panel.get("target") is not None:
            ax.axhline(panel["target"], color="#d62728", linestyle="--", linewidth=1,
                       label=f"target {panel['target_text']}")
            ax.legend(fontsize=7, loc="upper right", frameon=False)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(panel["unit"], fontsize=8)
        top = max([*drawn, panel.get("target") or 0])
        ax.set_ylim(0, top * 1.35 if top else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    title = f"sharpen, issue-7 benchmarks ({summary.get('date', '')}; docs/BENCHMARKS.md has commands and machines)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
