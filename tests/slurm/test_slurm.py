"""SLURM: `sharpen submit | status | logs | cancel` against a real two-node cluster on this machine
(tests/support/slurm_cluster.py), preemption and requeue included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import slurm_job
from support.e2e import assert_ok, losses, sharpen
from support.slurm_cluster import slurm_cluster_fixture
from support.slurm_job import STEPS, assert_same_losses

from cluster import slurm
from cluster.requeue import read_requeue_count

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
job_file = slurm_job.job_file
local_losses = slurm_job.local_losses


SECRET = "wandb-key-that-must-never-be-written"
JOB_TIMEOUT_S = 300

cluster = pytest.fixture(scope="session", name="cluster")(slurm_cluster_fixture)


# -- against the real cluster ---------------------------------------------------------------------------


def submit(job_file: Path, run_dir: Path, *overrides: str) -> str:
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = sharpen("submit", str(job_file), *sets, "--output-dir", str(run_dir), env={"WANDB_API_KEY": SECRET})
    assert_ok(result)
    job_id = (run_dir / slurm.JOB_ID_FILE).read_text().strip()
    assert f"submitted SLURM job {job_id}" in result.stdout
    return job_id


def wait_until(condition, what: str, timeout_s: float = JOB_TIMEOUT_S, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_for_end(job_id: str) -> dict:
    wait_until(lambda: not slurm.is_active(slurm.job_state(job_id)), f"job {job_id} to end", every_s=0.5)
    return slurm.job_state(job_id)


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def test_two_nodes_train_like_two_local_ranks(cluster, job_file, local_losses, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir)
    assert wait_for_end(job_id)["state"] == "COMPLETED"
    assert_same_losses(losses(run_dir), local_losses)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["nnodes"], plan["nproc_per_node"], plan["world_size"]) == (2, 1, 2)
    assert Path(plan["data_cache"]).is_relative_to(run_dir)  # every node reads the tokens from the run dir
    assert plan["stop_grace_s"] == 5.0  # half of the site's GraceTime (0) + KillWait (10), as submit read them

    status = sharpen("status", str(run_dir))
    assert_ok(status)
    assert f"job {job_id}: COMPLETED" in status.stdout and f"step {STEPS} of {STEPS}" in status.stdout
    log = sharpen("logs", str(run_dir))
    assert_ok(log)
    assert "node 0 of 2" in log.stdout and "node 1 of 2" in log.stdout and f"done: step {STEPS}" in log.stdout
    assert "Traceback" not in log.stdout and "TCPStore" not in log.stdout
    assert_ok(sharpen("logs", str(run_dir), "--rank", "1"))
    assert sharpen("logs", str(run_dir), "--rank", "7").returncode == 2
    for path in [run_dir / "plan.json", *run_dir.glob("slurm/*"), *run_dir.glob("logs/*.log")]:
        assert SECRET not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("to", ["steps", "full"])
def test_usr2_checkpoints_requeues_and_resumes_to_the_same_losses(cluster, job_file, local_losses, tmp_path, to):
    """USR2 to the job's steps only (`scancel --signal=USR2 JOB`, or a template's --signal=USR2@lead: the
    agents and the ranks get it, not the batch shell), or (with cluster.slurm.signal: USR1) USR1 to the
    steps and the batch shell (`--full`): the
    ranks stop together, checkpoint, rank 0 requeues; the requeued job resumes and ends with the
    uninterrupted run's losses. (USR2 to the batch shell alone, as --signal=B:USR2@lead sends it, is
    test_stop_without_requeue_budget_is_said_and_kept's.)"""
    run_dir = tmp_path / "run"
    signal_name = "USR1" if to == "full" else "USR2"  # cluster.slurm.signal names the one the job answers
    job_id = submit(job_file, run_dir, "logging.wandb.project=sharpen-tests", "logging.wandb.mode=offline",
                    f"cluster.slurm.signal={signal_name}")
    follow = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "logs", "-f", str(run_dir)], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        wait_until(lambda: logged_steps(run_dir) >= 3, "training to start")
        subprocess.run(["scancel", f"--signal={signal_name}", *(["--full"] if to == "full" else []), job_id], check=True)
        # SLURM holds a requeued job for two minutes (BeginTime); a test does not wait that long.
        wait_until(lambda: scontrol_job(job_id).get("Restarts") == "1", "the requeue", every_s=0.2)
        wait_until(lambda: scontrol_job(job_id).get("JobState") == "PENDING", "the job to be pending", every_s=0.2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        assert wait_for_end(job_id)["state"] == "COMPLETED"
        followed, _ = follow.communicate(timeout=60)  # `logs -f` ends by itself when the job has ended
    finally:
        follow.kill()

    stopped = re.search(r"stopped at step (\d+) .*requeueing job (\d+) \(1 of 2\)", followed)
    assert stopped, followed
    step = int(stopped.group(1))
    assert 3 <= step < STEPS, f"the signal should land mid-run, got step {step}"
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step}'} (step {step})" in followed
    assert f"done: step {STEPS}" in followed
    assert read_requeue_count(run_dir) == 1
    assert_same_losses(losses(run_dir), local_losses)
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )
    # One W&B run, continued: both attempts wrote under the run id kept in the run dir.
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(wandb_id) for p in attempts), attempts
    for path in [run_dir / "plan.json", *run_dir.glob("slurm/*"), *run_dir.glob("logs/*.log")]:
        assert SECRET not in path.read_text(errors="replace"), path


def test_cancel_checkpoints_within_the_grace_period_and_is_not_requeued(cluster, job_file, local_losses, tmp_path):
    """`sharpen cancel` (scancel: SIGTERM to the batch shell, the agents and the ranks, SIGKILL KillWait
    later): the ranks stop at the next step, which comes well within grace_s, and checkpoint; the job is
    cancelled, not requeued. Submitting it again into the run dir (here with launch: task_per_rank, one
    srun task per rank) resumes from that checkpoint and ends with the uninterrupted losses."""
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir, "cluster.slurm.grace_s=8")
    wait_until(lambda: logged_steps(run_dir) >= 3, "training to start")
    result = sharpen("cancel", str(run_dir))
    assert_ok(result)
    assert f"cancelled SLURM job {job_id}" in result.stdout
    assert wait_for_end(job_id)["state"] == "CANCELLED"
    time.sleep(2)  # a requeue would show by now
    assert scontrol_job(job_id)["JobState"] == "CANCELLED" and scontrol_job(job_id)["Restarts"] == "0"
    assert read_requeue_count(run_dir) == 0 and not (run_dir / "final").exists()
    log = slurm.log_path(run_dir, job_id).read_text()
    stopped = re.search(r"SIGTERM: stopped at step (\d+) within the grace period \(8 s", log)
    assert stopped, log
    step = int(stopped.group(1))
    assert 3 <= step < STEPS and (run_dir / "checkpoints" / f"step-{step}").is_dir()
    assert "Traceback" not in log
    again = sharpen("cancel", str(run_dir))
    assert_ok(again)
    assert "nothing to cancel" in again.stdout

    second = submit(job_file, run_dir, "cluster.slurm.launch=task_per_rank")
    assert wait_for_end(second)["state"] == "COMPLETED"
    assert "-m training.worker" in (run_dir / slurm.SCRIPT).read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step}'}" in (run_dir / "logs" / "rank-0.log").read_text()
    assert_same_losses(losses(run_dir), local_losses)


def test_stop_without_requeue_budget_is_said_and_kept(cluster, job_file, tmp_path):
    """USR2 to the batch shell alone (what --signal=B:USR2@lead sends) with max_requeues used up: a
    checkpoint, no requeue, and the log says how to go on."""
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir, "cluster.slurm.max_requeues=0")
    wait_until(lambda: logged_steps(run_dir) >= 3, "training to start")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    assert wait_for_end(job_id)["state"] == "FAILED"  # not done, and not requeued
    log = slurm.log_path(run_dir, job_id).read_text()
    stopped = re.search(r"stopped at step (\d+) .*max_requeues \(0\) is used up", log)
    assert stopped, log
    assert "sharpen submit" in log.split("max_requeues (0) is used up")[1].splitlines()[0]
    assert scontrol_job(job_id)["Restarts"] == "0" and not (run_dir / "final").exists()
    assert (run_dir / "checkpoints" / f"step-{stopped.group(1)}").is_dir()
    assert "rank 0 failed" not in log  # it stopped on purpose


def test_sbatch_refusal_is_shown_plainly(cluster, job_file, tmp_path):
    """Four nodes from a two-node partition: sbatch's own words, exit 2, no traceback."""
    result = sharpen("submit", str(job_file), "--set", "resources.nodes=4", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "sbatch refused the job" in result.stderr and "sbatch: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_requeue_is_said_and_not_counted(cluster, tmp_path):
    """`scontrol requeue` of a job SLURM does not know: the reason comes back, the count is given back."""
    from cluster.requeue import requeue, write_requeue_count

    write_requeue_count(tmp_path, 1)
    failure = requeue(tmp_path, "999999")
    assert failure is not None and "`scontrol requeue 999999` failed" in failure and "sharpen submit" in failure
    assert read_requeue_count(tmp_path) == 0
