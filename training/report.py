"""RUN/report.png and RUN/report.md at the end of every run: the curves and the figures, from metrics.jsonl."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from training.samples import report_section


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of RUN/metrics.jsonl. A line that does not parse (the last one, half
    written, while a run is appending to it) is skipped."""
    train, evaluation = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                (train if "loss" in row else evaluation).append(row)
    return train, evaluation


def summary(train: list[dict], evaluation: list[dict], plan: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The run's figures. Throughput is the median over logged intervals after the first (start-up)."""
    steady = train[1:] or train
    figures: dict[str, Any] = {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "min_loss": min(r["loss"] for r in train) if train else None,
        "tokens": train[-1]["tokens"] if train else 0,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady) if steady else None,
        "wall_s": train[-1]["elapsed_s"] if train else None,
        "strategy": plan.get("strategy"),
        "world_size": plan.get("world_size"),
        "device": plan.get("device"),
        # the fp32 CPU matmul engine every rank ran (training/kernels/cpu_gemm.py); a GPU run has none to show
        "cpu_matmul": plan.get("cpu_matmul") if plan.get("device") == "cpu" else None,
    }
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    if mfu:
        figures["mfu"] = statistics.median(mfu)
    if evaluation:
        figures["final_eval_loss"] = evaluation[-1].get("eval/loss")
    rewards = [r["reward"] for r in train if r.get("reward") is not None]  # grpo: the mean reward per step
    if rewards:
        figures.update(first_reward=rewards[0], final_reward=rewards[-1], max_reward=max(rewards))
    figures.update(extra)
    return figures


def write_report(run_dir: Path, plan: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.md and report.png; returns the figures."""
    train, evaluation = read_rows(run_dir)
    figures = summary(train, evaluation, plan, extra or {})
    _plot(run_dir / "report.png", train, evaluation)
    lines = [
        f"# {plan.get('job', {}).get('name', run_dir.name)}",
        "",
        f"{figures['world_size']} rank(s) on {figures['device']}, strategy {figures['strategy']}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key, value in figures.items():
        if key in ("strategy", "world_size", "device") or value is None:
            continue
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "![loss, learning rate, throughput (and reward)](report.png)", ""]
    lines += report_section(run_dir)  # the eval prompts completed before and after training (training/samples.py)
    (run_dir / "report.md").write_text("\n".join(lines))
    return figures


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plot(path: Path, train: list[dict], evaluation: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewarded = [r for r in train if r.get("reward") is not None]  # grpo
    fig, axes = plt.subplots(1, 4 if rewarded else 3, figsize=(17 if rewarded else 13, 3.6))
    steps = [r["step"] for r in train]
    if rewarded:
        at, mean = [r["step"] for r in rewarded], [r["reward"] for r in rewarded]
        std = [r.get("reward_std") or 0.0 for r in rewarded]
        axes[3].plot(at, mean)
        axes[3].fill_between(at, [m - d for m, d in zip(mean, std, strict=True)], [m + d for m, d in zip(mean, std, strict=True)], alpha=0.2)
        axes[3].set_title("reward (mean ± std)")
    axes[0].plot(steps, [r["loss"] for r in train], label="train")
    if evaluation:
        axes[0].plot([r["step"] for r in evaluation], [r.get("eval/loss") for r in evaluation], "o-", label="eval")
        axes[0].legend()
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r["tokens_per_s"] for r in train])
    axes[2].set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
