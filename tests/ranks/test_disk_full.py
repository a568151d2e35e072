"""A full disk never leaves a broken checkpoint: the run dir on a small tmpfs this test mounts, where the
first checkpoint fits and the second does not. The run exits 1 with one clear message, the previous
checkpoint still verifies against its manifest, and no step-N.tmp is left behind."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.e2e import ALPACA, base_job, sharpen, write_job

from training import checkpoint
from training.env_hooks import FAULT

MESSAGE = "not enough disk space for checkpoint step-4"
# The tiny model's checkpoint takes about 2.2 MiB on disk (its plan estimates 1.6 MiB); the rest of the run
# dir (plan, logs, metrics) some tens of KiB.
ONE_CHECKPOINT_FITS = "3500k"  # step-2 fits; step-4, measured against step-2, does not
TWO_CHECKPOINTS_FIT = "6m"


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the run dir (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def run_on(tmp_path: Path, model: Path, size: str, fault: str | None = None, ranks: int = 1):
    job = base_job(
        model, ALPACA,
        train={"max_steps": 4, "save_every": 2, "keep_last": 1},
        strategy={"name": "ddp" if ranks > 1 else "single"},
        resources={"gpus_per_node": ranks},
    )
    job_file = write_job(tmp_path / "job.yaml", job)
    with tmpfs(tmp_path / "mnt", size) as mnt:
        run_dir = mnt / "run"
        result = sharpen("run", str(job_file), "--output-dir", str(run_dir), env={FAULT: fault} if fault else None)
        root = checkpoint.checkpoints_dir(run_dir)
        left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        previous = root / "step-2"
        problems = checkpoint.verify(previous) if previous.is_dir() else ["no step-2"]
        free = shutil.disk_usage(mnt).free
    return result, left, problems, free


def assert_failed_cleanly(result, left, problems) -> None:
    assert result.returncode == 1, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    error_line = next(line for line in result.stderr.splitlines() if "DiskFullError" in line)
    assert MESSAGE in error_line and "free space there" in error_line and "--output-dir" in error_line
    assert "/run/checkpoints" in error_line
    assert left == ["step-2"], left  # no step-4.tmp, the previous checkpoint kept
    assert problems == []


def test_checkpoint_that_does_not_fit_is_not_written(tiny_model, tmp_path):
    """Step 2 fits, step 4 (expected: step 2's size) does not: refused before anything is written."""
    result, left, problems, _ = run_on(tmp_path, tiny_model, ONE_CHECKPOINT_FITS)
    assert_failed_cleanly(result, left, problems)
    assert "it was not written" in result.stderr


def test_disk_filling_up_during_the_write(tiny_model, tmp_path):
    """The space check passes, then the disk fills (another writer) and DCP's write meets a real ENOSPC,
    reported as a RuntimeError: caught, the partial step-4.tmp removed, the same message."""
    result, left, problems, free = run_on(tmp_path, tiny_model, TWO_CHECKPOINTS_FIT, fault="fill-disk-in-save:4")
    assert_failed_cleanly(result, left, problems)
    assert "the disk filled up while it was written" in result.stderr
    assert free > 1024**2  # the filler went with step-4.tmp


def test_two_ranks_agree_to_stop(tiny_model, tmp_path):
    """Rank 0 measures, both ranks raise: the run ends (no rank left waiting in a collective)."""
    result, left, problems, _ = run_on(tmp_path, tiny_model, ONE_CHECKPOINT_FITS, ranks=2)
    assert_failed_cleanly(result, left, problems)
