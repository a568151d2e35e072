"""`sharpen compare RUN RUN...`: runs' loss (eval loss, reward) curves overlaid in one PNG, their figures side by
side on stdout, from each run's plan.json and metrics.jsonl (training/report.py reads both)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.errors import UserError

DEFAULT_OUT = "compare.png"


def register(sub) -> None:
    """The `compare` subcommand's arguments."""
    p = sub.add_parser("compare", help="runs' loss curves in one PNG and their figures side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="two or more run directories")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FILE.png", help=f"the picture (default ./{DEFAULT_OUT})")


def run_dirs(paths: list[str]) -> list[Path]:
    """The run dirs named, checked: two or more, each holding plan.json."""
    if len(paths) < 2:
        one = Path(paths[0])
        raise UserError(
            f"compare needs two or more run directories, got one: {one}",
            f"one run's curves and figures are in {one / 'report.png'} and {one / 'report.md'}",
        )
    not_runs = [p for p in paths if not (Path(p) / "plan.json").is_file()]
    if not_runs:
        raise UserError(
            f"not a sharpen run directory (no plan.json): {', '.join(not_runs)}",
            "give the directories `sharpen run` or `sharpen submit` wrote (--output-dir)",
        )
    return [Path(p) for p in paths]


def labels(dirs: list[Path]) -> list[str]:
    """Each run's name in the legend and the table: its directory's name, with its parent's where two share it."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def figures(run_dir: Path) -> dict[str, Any]:
    """One run's figures (training/report.py's summary) with its method and fine-tune type, and its rows."""
    from training.report import read_rows, summary

    plan = json.loads((run_dir / "plan.json").read_text())
    train, evaluation = read_rows(run_dir)
    out = summary(train, evaluation, plan, {})
    job = plan.get("job", {})
    out.update(method=job.get("method", {}).get("kind"), finetune=job.get("finetune", {}).get("type"),
               offload=plan.get("offload", "none"), train=train, evaluation=evaluation)
    return out


def wall_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def strategy_text(f: dict) -> str:
    from launcher.candidates import candidate_label

    return candidate_label(f["strategy"], f["offload"]) if f["strategy"] else "-"


# The table's rows: (name, the figure it shows, as text), in order; the eval and reward rows only where a run has them.
ROWS: tuple[tuple[str, Callable[[dict], Any]], ...] = (
    ("steps", lambda f: f["steps"]),
    ("first loss", lambda f: f["first_loss"]),
    ("final loss", lambda f: f["final_loss"]),
    ("min loss", lambda f: f["min_loss"]),
    ("final eval loss", lambda f: f.get("final_eval_loss")),
    ("final reward", lambda f: f.get("final_reward")),
    ("final reward margin", lambda f: f["train"][-1].get("rewards/margin") if f["train"] else None),
    ("tokens/s", lambda f: None if f["tokens_per_s"] is None else f"{f['tokens_per_s']:,.0f}"),
    ("wall time", lambda f: None if f["wall_s"] is None else wall_time(f["wall_s"])),
    ("strategy", strategy_text),
    ("ranks", lambda f: f["world_size"]),
    ("method", lambda f: f["method"]),
    ("fine-tune", lambda f: f["finetune"]),
)
OPTIONAL_ROWS = ("final eval loss", "final reward", "final reward margin")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(names: list[str], runs: list[dict]):
    """The figures side by side: one row per figure, one column per run."""
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD)
    t.add_column("", style="bold", no_wrap=True)
    for name in names:
        t.add_column(name, justify="right")
    for row, value in ROWS:
        cells = [cell(value(f)) for f in runs]
        if row in OPTIONAL_ROWS and all(c == "-" for c in cells):
            continue
        t.add_row(row, *cells)
    return t


def plot(out: Path, names: list[str], runs: list[dict]) -> None:
    """One subplot per metric any run logged (loss, eval loss, reward, reward margin), each run one labelled line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("loss", "train", "loss"), ("eval loss", "evaluation", "eval/loss"), ("reward", "train", "reward"),
               ("reward margin", "train", "rewards/margin")]  # grpo's reward; the DPO family's implicit margin
    shown = [m for m in metrics if any(r.get(m[2]) is not None for f in runs for r in f[m[1]])]
    shown = shown or metrics[:1]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 3.8), squeeze=False)
    for ax, (title, rows, key) in zip(axes[0], shown, strict=True):
        for i, (name, f) in enumerate(zip(names, runs, strict=True)):
            points = [(r["step"], r[key]) for r in f[rows] if r.get(key) is not None]
            if points:  # a run keeps its colour in every panel, also where another run has no line
                ax.plot(*zip(*points, strict=True), "o-" if rows == "evaluation" else "-", label=name, color=f"C{i % 10}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=90)
    except ValueError as e:  # an extension matplotlib writes no format for
        raise UserError(f"--out {out}: {e}", "give a .png file") from None
    finally:
        plt.close(fig)


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from launcher.report import WIDTH

    dirs = run_dirs(args.run_dirs)
    names = labels(dirs)
    runs = [figures(d) for d in dirs]
    out = Path(args.out)
    plot(out, names, runs)
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH)
    console.print(table(names, runs))
    print(f"curves: {out}")
    return 0


COMMANDS = {"compare": cmd_compare}
