"""After a SLURM stop request has been checkpointed: requeue the job, counted against max_requeues.

USR2 (to the batch shell, the agents or the ranks) becomes a stop request; every rank agrees on the step
to stop at (training/preemption.py) and the loop writes a checkpoint there. Then `stop_and_requeue`:
rank 0 requeues the job with `scontrol requeue` (counted in RUN/slurm/requeue_count), and the requeued
job resumes from that checkpoint by itself. After SIGTERM the ranks stop the same way and nobody requeues.
It is handed its settings; it reads no plan.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import IO, NoReturn

from cluster.environment import slurm_job_id

log = logging.getLogger("sharpen")

REQUEUE_COUNT_FILE = "slurm/requeue_count"
# The exit code of a rank that stopped early without being requeued: not done, but nothing failed.
EXIT_STOPPED_EARLY = 3


def read_requeue_count(run_dir: Path) -> int:
    path = Path(run_dir) / REQUEUE_COUNT_FILE
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def write_requeue_count(run_dir: Path, count: int) -> None:
    path = Path(run_dir) / REQUEUE_COUNT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{count}\n")
    os.replace(tmp, path)


RESUBMIT = "continue with `sharpen submit JOB.yaml --output-dir RUN_DIR` (it resumes from the checkpoint)"


def requeue_plan(run_dir: Path, allowed: bool, max_requeues: int) -> tuple[str | None, str]:
    """Whether this SLURM job may be requeued (cluster.slurm.requeue and max_requeues are `allowed` and
    `max_requeues`): (job id, what will happen) or (None, why not). Counts the requeue against
    max_requeues (RUN/slurm/requeue_count) when it may."""
    job_id = slurm_job_id()
    used = read_requeue_count(run_dir)
    if job_id is None:
        return None, "not inside a SLURM job"
    if not allowed:
        return None, f"cluster.slurm.requeue is false; {RESUBMIT}"
    if used >= max_requeues:
        return None, f"cluster.slurm.max_requeues ({max_requeues}) is used up; {RESUBMIT}"
    write_requeue_count(run_dir, used + 1)
    return job_id, f"requeueing job {job_id} ({used + 1} of {max_requeues})"


def requeue(run_dir: Path, job_id: str) -> str | None:
    """`scontrol requeue JOB`: None when SLURM took it, else why not (and the count is given back)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        failure = str(exc)
    else:
        if result.returncode == 0:
            return None
        failure = (result.stderr or result.stdout).strip()
    write_requeue_count(run_dir, read_requeue_count(run_dir) - 1)
    return f"`scontrol requeue {job_id}` failed: {failure}; {RESUBMIT}"


def stop_and_requeue(
    run_dir: Path, step: int, checkpoint: Path | None, request, is_main: bool, console: IO[str] | None, *,
    allowed: bool, max_requeues: int,
) -> NoReturn:
    """After a stop request (training/preemption.py) every rank exits. USR2: rank 0 requeues the job
    (SLURM ends the job on requeue). SIGTERM: nobody requeues: a preempted job is requeued by SLURM
    itself (PreemptMode=REQUEUE), a cancelled one is meant to end; `checkpoint` is None when the step
    boundary came after the grace period.

    The notice goes out before `scontrol requeue`: the requeue itself makes SLURM kill the job's steps,
    this rank with them, and a line written after it can be lost."""
    # The requeue (or the cancel) makes SLURM send SIGTERM while this process exits; Python puts the default
    # handlers back as it shuts down, and that SIGTERM would turn this clean stop into a rank killed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})
    if request.kind != "requeue":
        if is_main:
            _say(console, terminate_notice(run_dir, step, checkpoint, request.grace_s))
        raise SystemExit(EXIT_STOPPED_EARLY)
    if not is_main:
        raise SystemExit(0)
    job_id, what = requeue_plan(run_dir, allowed, max_requeues)
    _say(console, f"sharpen: stopped at step {step} before the allocation ends; checkpoint {checkpoint}; {what}")
    failure = requeue(run_dir, job_id) if job_id is not None else None
    if failure is not None:
        _say(console, f"sharpen: {failure}")
    raise SystemExit(0 if job_id is not None and failure is None else EXIT_STOPPED_EARLY)


def terminate_notice(run_dir: Path, step: int, checkpoint: Path | None, grace_s: float) -> str:
    if checkpoint is not None:
        return (
            f"sharpen: SIGTERM: stopped at step {step} within the grace period ({grace_s:.0f} s, "
            f"cluster.slurm.grace_s); checkpoint {checkpoint}; a requeued job, or `sharpen submit` into this "
            "run dir, resumes from it"
        )
    from training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    kept = f"the newest complete checkpoint, {latest[1]}, is where" if latest else "no checkpoint yet: "
    return (
        f"sharpen: SIGTERM: step {step} ended after the grace period ({grace_s:.0f} s, cluster.slurm.grace_s), "
        f"too late to write a checkpoint before SLURM kills the job; stopped without one; {kept} a requeued job "
        "resumes"
    )


def _say(console: IO[str] | None, message: str) -> None:
    log.warning(message)
    if console is not None:
        console.write(message + "\n")
        console.flush()
