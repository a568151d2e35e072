"""Helpers for end-to-end tests: run the real `sharpen` CLI in a subprocess and read its run dir."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
ALPACA = EXAMPLES / "data" / "alpaca_tiny.jsonl"


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def base_job(model_dir: Path, data_file: Path, **sections) -> dict:
    """A small SFT job on the tiny model; override any section with keyword arguments."""
    job = {
        "name": "e2e",
        "model": {"path": str(model_dir)},
        "finetune": {"type": "full"},
        "method": {"kind": "sft"},
        "data": {"train": [{"path": str(data_file), "format": "alpaca"}], "max_length": 128},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 4, "lr": 1.0e-3, "seed": 0},
        "strategy": {"name": "single"},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": "cpu",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def sharpen(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `sharpen ARGS` as a user would (a new process), capturing its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(cwd or REPO),
    )


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir)]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def run_job(tmp_path: Path, name: str, job: dict, env: dict | None = None, ok: bool = True):
    """`sharpen run` of `job` written to tmp_path/NAME.yaml into tmp_path/NAME; asserts exit 0 when `ok`."""
    run_dir = tmp_path / name
    result = sharpen("run", str(write_job(tmp_path / f"{name}.yaml", job)), "--output-dir", str(run_dir), env=env)
    if ok:
        assert_ok(result)
    return run_dir, result


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "eval/loss" in r]


def assert_same(got: list[float], want: list[float], what: str, rel: float = 1e-4) -> None:
    assert len(got) == len(want) > 0, (got, want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(g, w, rel_tol=rel, abs_tol=1e-6), f"{what} {i}: {g} vs {w}"
