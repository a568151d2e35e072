"""Stopping every rank at the same step when SLURM announces the end of the allocation, then requeueing.

The batch script's USR2 trap touches RUN/slurm/stop (cluster/slurm.py). After each step rank 0 looks
for that file and one all-reduce of a flag makes every rank agree on the same step: a rank that stopped
alone would leave the others waiting in a collective. The agreed flag is read one step after it was
reduced, so the host never waits for the device to finish a step just to learn it should go on. The loop then writes a checkpoint and calls
`stop_and_requeue`: rank 0 requeues the job with `scontrol requeue` (counted against max_requeues in
RUN/slurm/requeue_count), and the requeued job resumes from that checkpoint by itself.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, NoReturn

from cluster.slurm import STOP_FILE

log = logging.getLogger("sharpen")

REQUEUE_COUNT_FILE = "slurm/requeue_count"
# The exit code of a rank that stopped early without being requeued: not done, but nothing failed.
EXIT_STOPPED_EARLY = 3


def slurm_stop_request(strategy, run_dir: Path) -> Callable[[], bool] | None:
    """A should_stop() for the loop inside a SLURM job (None elsewhere). Every rank must call it after
    every step: it is a collective."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    import torch  # here, not at the top: `sharpen status` reads the requeue count without loading torch

    env, stop_file = strategy.env, Path(run_dir) / STOP_FILE
    in_flight: list[tuple[torch.Tensor, object]] = []  # the last step's agreed flag, on its way to the host

    def should_stop() -> bool:
        # Only rank 0 touches the filesystem; the file is written on its node, so it sees it first.
        flag = torch.full((1,), float(env.is_main and stop_file.exists()), device=env.device)
        agreed = strategy.all_reduce_sum(flag)
        # Reading `agreed` now would make the host wait for the device to finish this step (with NCCL the
        # flag is a device tensor), so it is copied to the host asynchronously and read one step later,
        # when that copy is long done: every rank stops at the step after the request, together.
        cuda = env.device.type == "cuda"
        host = torch.empty(1, pin_memory=cuda)
        host.copy_(agreed, non_blocking=True)
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        in_flight.append((host, copied))
        if len(in_flight) < 2:
            return False
        host, copied = in_flight.pop(0)
        if copied is not None:
            copied.synchronize()  # this event marks the previous step's flag copy, not this step's work
        return bool(host.item() > 0)

    return should_stop


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


def requeue_plan(run_dir: Path) -> tuple[str | None, str]:
    """Whether this SLURM job may be requeued: (job id, what will happen) or (None, why not).
    Counts the requeue against max_requeues (RUN/slurm/requeue_count) when it may."""
    from launcher.plan import Plan

    slurm = Plan.read(run_dir).spec.cluster.slurm
    job_id = os.environ.get("SLURM_JOB_ID")
    used = read_requeue_count(run_dir)
    if job_id is None:
        return None, "not inside a SLURM job"
    if not slurm.requeue:
        return None, f"cluster.slurm.requeue is false; {RESUBMIT}"
    if used >= slurm.max_requeues:
        return None, f"cluster.slurm.max_requeues ({slurm.max_requeues}) is used up; {RESUBMIT}"
    write_requeue_count(run_dir, used + 1)
    return job_id, f"requeueing job {job_id} ({used + 1} of {slurm.max_requeues})"


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


def stop_and_requeue(run_dir: Path, step: int, checkpoint: Path, is_main: bool, console: IO[str] | None) -> NoReturn:
    """After the stop checkpoint: rank 0 requeues the job; every rank exits (SLURM ends the job on requeue).

    The notice goes out before `scontrol requeue`: the requeue itself makes SLURM kill the job's steps,
    this rank with them, and a line written after it can be lost."""
    if not is_main:
        raise SystemExit(0)

    def say(message: str) -> None:
        log.warning(message)
        if console is not None:
            console.write(message + "\n")
            console.flush()

    job_id, what = requeue_plan(run_dir)
    say(f"sharpen: stopped at step {step} before the allocation ends; checkpoint {checkpoint}; {what}")
    failure = requeue(run_dir, job_id) if job_id is not None else None
    if failure is not None:
        say(f"sharpen: {failure}")
    raise SystemExit(0 if job_id is not None and failure is None else EXIT_STOPPED_EARLY)
