"""The two arms the side-by-side benches run: `sharpen run` on a job file, and bench/hf_trainer.py on the
rows sharpen trains on, in its order; and the environment both processes get.

Only the standard library at import: bench/startup.py's replays time the imports that follow theirs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import harness

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def process_env(threads: int | None = None) -> dict[str, str]:
    """This process's environment for an arm's process: output unbuffered, no tokenizer threads, and
    `threads` OpenMP/MKL threads when given (the GPU bench leaves the thread count as it is)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def sharpen_executable() -> list[str]:
    """The `sharpen` console script beside this Python, or the CLI module where it is not installed."""
    script = Path(sys.executable).parent / "sharpen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"]


def fresh_dir(path: Path) -> Path:
    """`path`, emptied and created (a run dir that holds a checkpoint would resume)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_sharpen(
    job: Path, run_dir: Path, *, steps: int, env: dict[str, str], window: tuple[int, int] | None = None,
    overrides: Sequence[str] = (),
) -> tuple[harness.Timing, list[dict]]:
    """`sharpen run JOB` into a fresh `run_dir` (each of `overrides` a `--set key=value`), timed from
    outside; its training rows of metrics.jsonl, checked to be one a step for `steps` steps."""
    fresh_dir(run_dir)
    cmd = [*sharpen_executable(), "run", str(job), "--output-dir", str(run_dir)]
    for override in overrides:
        cmd += ["--set", override]
    timing = harness.run_timed(
        cmd, env=env, step_log=run_dir / "metrics.jsonl", log_file=run_dir / "bench.log", window=window, cwd=REPO,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "elapsed_s" in r]  # training rows, not eval ones
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"{run_dir}/metrics.jsonl does not hold one row per step")
    return timing, rows


def row_lengths(dataset):
    """The token count of each row of a prepared dataset, as int64 numbers."""
    import numpy as np

    return np.asarray(dataset.with_format("arrow")["length"]).astype(np.int64)


def sharpen_order(dataset, *, batch: int, steps: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Row indices of each of `steps` steps of `batch` rows, in the order sharpen feeds them to one rank
    without accumulation (training/data/sampler.py's epoch_order and deal)."""
    from training.data.sampler import deal, epoch_order

    lengths = row_lengths(dataset)
    per_epoch = len(lengths) // batch
    if per_epoch < 1:
        raise SystemExit(f"{len(lengths)} packed rows, fewer than one batch of {batch}")
    order = []
    for step in range(steps):
        epoch, position = divmod(step, per_epoch)
        members = epoch_order(len(lengths), seed, epoch, shuffle)[position * batch : (position + 1) * batch]
        order.append(deal(members, lengths, 1, 1, batch)[0][0])
    return order


def write_hf_rows(dataset, order: list[list[int]], out: Path) -> Path:
    """The rows of `order`, in that order, saved for bench/hf_trainer.py at `out`."""
    import datasets

    rows = [dataset[i] for step in order for i in step]
    # sharpen stores labels already shifted (labels[i] is the target of position i); HF wants the
    # target at its own position: -100 for the first token, then sharpen's labels moved one right.
    hf = {
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [[1] * len(r["input_ids"]) for r in rows],
        "labels": [[-100, *r["labels"][:-1]] for r in rows],
    }
    shutil.rmtree(out, ignore_errors=True)
    datasets.Dataset.from_dict(hf).save_to_disk(str(out))
    return out


def hf_config(spec, *, model: Path, dataset: Path, out: Path, device: str, threads: int | None, lora: dict,
              **extra) -> dict:
    """bench/hf_trainer.py's config for the job `spec` (a JobSpec): its steps, batch, seed, optimizer and
    LR schedule; `extra` adds keys such as dtype and attention."""
    t = spec.train
    return {
        "model": str(model), "dataset": str(dataset), "output_dir": str(out), "device": device,
        "threads": threads, "seed": t.seed, "max_steps": t.max_steps, "micro_batch_size": t.micro_batch_size,
        "log_every": 1, "lora": lora, **extra,
        "optimizer": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "lr_scheduler": t.lr_scheduler, "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio,
        },
    }


def run_hf(config: dict, *, env: dict[str, str], window: tuple[int, int] | None = None) -> tuple[harness.Timing, dict]:
    """bench/hf_trainer.py on `config` in its own process, into a fresh output_dir, timed from outside;
    its result.json, checked to hold a loss for each of max_steps steps."""
    out = fresh_dir(Path(config["output_dir"]))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    timing = harness.run_timed(
        [sys.executable, str(BENCH / "hf_trainer.py"), str(out / "config.json")],
        env=env, step_log=out / "steps.jsonl", log_file=out / "bench.log", window=window, cwd=REPO,
    )
    result = json.loads((out / "result.json").read_text())
    if len(result["losses"]) != config["max_steps"]:
        raise RuntimeError(f"HF Trainer ran {len(result['losses'])} steps, not {config['max_steps']}")
    return timing, result
