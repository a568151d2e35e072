"""SLURM: the rendered sbatch script (golden files), and `sharpen submit | status | logs | cancel` against a
real two-node cluster on this machine (tests/slurm_cluster.py), preemption and requeue included."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import ALPACA, assert_ok, base_job, losses, sharpen, write_job
from slurm_cluster import slurm_cluster_fixture

from cluster import slurm
from cluster.requeue import read_requeue_count
from launcher.errors import UserError
from launcher.planner import build_plan
from launcher.shapes import ParamCounts
from launcher.spec import JobSpec
from training.env_hooks import UPDATE_GOLDEN

GOLDEN = Path(__file__).parent / "golden"
STEPS = 120  # 15-70 ms each here: long enough to signal the job mid-run, short enough for a quick test
SECRET = "wandb-key-that-must-never-be-written"
JOB_TIMEOUT_S = 300

cluster = pytest.fixture(scope="session", name="cluster")(slurm_cluster_fixture)


# -- the rendered script ------------------------------------------------------------------------------


def golden_plan(launch: str):
    slurm_spec = {
        "partition": "gpu", "account": "proj42", "qos": "high", "time": "2-00:00:00", "constraint": "h100",
        "cpus_per_task": 12, "mem": "480G", "exclusive": True, "gpu_flag": "gres",
        "extra_sbatch": ["--mail-type=END", "#SBATCH --reservation=llm"],
        "setup": ["module load cuda/12.4", 'echo "job $SLURM_JOB_ID on $(hostname)"'],
        "signal_lead_s": 300, "requeue": True, "max_requeues": 5, "launch": launch,
    }  # fmt: skip
    spec = JobSpec.model_validate(
        {
            "name": "llama3-8b-lora",
            "model": {"path": "meta-llama/Meta-Llama-3-8B"},
            "data": {"train": [{"path": "data/train.jsonl"}]},
            "train": {"global_batch_size": 128, "micro_batch_size": 4},
            "strategy": {"name": "fsdp"},
            "resources": {"nodes": 2, "gpus_per_node": 8},
            "cluster": {"kind": "slurm", "slurm": slurm_spec},
        }
    )
    counts = ParamCounts(8_000_000_000, 8_000_000_000, 0, 0, 32, 4096, 128256)
    plan, _ = build_plan(spec, Path("/scratch/runs/llama3-8b-lora"), device="cuda", counts=counts)
    return plan


@pytest.mark.parametrize("launch,golden", [("agent", "job.sbatch"), ("task_per_rank", "job-task-per-rank.sbatch")])
def test_sbatch_script_matches_golden_file(launch, golden):
    """A change to the script is a reviewed diff: regenerate with SHARPEN_UPDATE_GOLDEN=1 and read it."""
    rendered = slurm.render_sbatch(golden_plan(launch), python="/opt/sharpen/venv/bin/python")
    path = GOLDEN / golden
    if os.environ.get(UPDATE_GOLDEN):
        path.write_text(rendered)
    assert rendered == path.read_text()


def test_cpu_jobs_ask_for_no_gpus_and_bad_extra_options_are_refused():
    plan = golden_plan("agent")
    cpu_plan = plan.model_copy(update={"device": "cpu"})
    assert not any(re.match(r"#SBATCH --(gres|gpus)", line) for line in slurm.sbatch_lines(cpu_plan))
    job = plan.job
    job["cluster"]["slurm"]["extra_sbatch"] = ["reservation=llm"]
    with pytest.raises(UserError, match=r"extra_sbatch.0: 'reservation=llm' is not an sbatch option"):
        slurm.render_sbatch(plan.model_copy(update={"job": job}))


# -- against the real cluster ---------------------------------------------------------------------------



@pytest.fixture(scope="module")
def job_file(tiny_model, tmp_path_factory) -> Path:
    """2 nodes × 1 rank on SLURM (ddp on gloo), logging every step."""
    job = base_job(
        tiny_model, ALPACA,
        train={"max_steps": STEPS}, strategy={"name": "ddp"}, resources={"nodes": 2, "gpus_per_node": 1},
        cluster={"kind": "slurm", "slurm": {"time": "00:15:00", "signal_lead_s": 60, "max_requeues": 2}},
    )  # fmt: skip
    return write_job(tmp_path_factory.mktemp("job") / "job.yaml", job)


@pytest.fixture(scope="module")
def local_losses(job_file, tmp_path_factory) -> list[float]:
    """The same job run here by `sharpen run` on 2 local ranks: the numbers every SLURM run must give."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    single_node = ["--set", "resources.nodes=1", "--set", "resources.gpus_per_node=2", "--set", "cluster.kind=local"]
    assert_ok(sharpen("run", str(job_file), *single_node, "--output-dir", str(run_dir)))
    got = losses(run_dir)
    assert len(got) == STEPS and got[-1] < got[0]
    return got


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


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-6), f"step {step}: {g} on SLURM vs {w} locally"


@pytest.mark.slurm
def test_two_nodes_train_like_two_local_ranks(cluster, job_file, local_losses, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir)
    assert wait_for_end(job_id)["state"] == "COMPLETED"
    assert_same_losses(losses(run_dir), local_losses)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["nnodes"], plan["nproc_per_node"], plan["world_size"]) == (2, 1, 2)
    assert Path(plan["data_cache"]).is_relative_to(run_dir)  # every node reads the tokens from the run dir

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


@pytest.mark.slurm
def test_usr2_checkpoints_requeues_and_resumes_to_the_same_losses(cluster, job_file, local_losses, tmp_path):
    """USR2 to the batch shell (what --signal=B:USR2@lead sends): the ranks stop together, checkpoint,
    rank 0 requeues; the requeued job resumes and ends with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir, "logging.wandb.project=sharpen-tests", "logging.wandb.mode=offline")
    follow = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "logs", "-f", str(run_dir)], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        wait_until(lambda: logged_steps(run_dir) >= 3, "training to start")
        subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
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


@pytest.mark.slurm
def test_cancel_is_not_requeued(cluster, job_file, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir)
    wait_until(lambda: logged_steps(run_dir) >= 1, "training to start")
    result = sharpen("cancel", str(run_dir))
    assert_ok(result)
    assert f"cancelled SLURM job {job_id}" in result.stdout
    assert wait_for_end(job_id)["state"] == "CANCELLED"
    time.sleep(2)  # a requeue would show by now
    assert scontrol_job(job_id)["JobState"] == "CANCELLED" and scontrol_job(job_id)["Restarts"] == "0"
    assert read_requeue_count(run_dir) == 0 and not (run_dir / "final").exists()
    again = sharpen("cancel", str(run_dir))
    assert_ok(again)
    assert "nothing to cancel" in again.stdout


@pytest.mark.slurm
def test_stop_without_requeue_budget_then_resubmit_resumes(cluster, job_file, local_losses, tmp_path):
    """max_requeues used up: USR2 still gives a checkpoint but no requeue; submitting the job again into the
    same run dir (here with launch: task_per_rank, one srun task per rank) finishes it with the same losses."""
    run_dir = tmp_path / "run"
    job_id = submit(job_file, run_dir, "cluster.slurm.max_requeues=0")
    wait_until(lambda: logged_steps(run_dir) >= 3, "training to start")
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    assert wait_for_end(job_id)["state"] == "FAILED"  # not done, and not requeued
    log = slurm.log_path(run_dir, job_id).read_text()
    stopped = re.search(r"stopped at step (\d+) .*max_requeues \(0\) is used up", log)
    assert stopped, log
    assert scontrol_job(job_id)["Restarts"] == "0" and not (run_dir / "final").exists()
    assert (run_dir / "checkpoints" / f"step-{stopped.group(1)}").is_dir()

    second = submit(job_file, run_dir, "cluster.slurm.launch=task_per_rank")
    assert second != job_id
    assert wait_for_end(second)["state"] == "COMPLETED"
    assert "-m training.worker" in (run_dir / slurm.SCRIPT).read_text()
    assert f"resumed from {run_dir / 'checkpoints'}" in (run_dir / "logs" / "rank-0.log").read_text()
    assert_same_losses(losses(run_dir), local_losses)


@pytest.mark.slurm
def test_sbatch_refusal_is_shown_plainly(cluster, job_file, tmp_path):
    """Four nodes from a two-node partition: sbatch's own words, exit 2, no traceback."""
    result = sharpen("submit", str(job_file), "--set", "resources.nodes=4", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "sbatch refused the job" in result.stderr and "sbatch: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_without_sbatch_on_path_exits_2(job_file, tmp_path):
    result = sharpen("submit", str(job_file), "--output-dir", str(tmp_path / "run"), env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "no sbatch on PATH" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    dry = sharpen("submit", str(job_file), "--dry-run", "--output-dir", str(tmp_path / "dry"), env={"PATH": str(tmp_path)})
    assert_ok(dry)
    assert "#SBATCH --nodes=2" in (tmp_path / "dry" / slurm.SCRIPT).read_text()
    assert (tmp_path / "dry" / "plan.json").is_file() and not (tmp_path / "dry" / slurm.JOB_ID_FILE).exists()


@pytest.mark.slow
def test_run_on_two_machines_without_slurm(job_file, local_losses, tmp_path):
    """`sharpen run --nnodes 2 --node-rank K --master HOST:PORT` on each machine (here twice on one):
    node 0 hosts the rendezvous, and the two 1-rank nodes train like 2 local ranks."""
    from cluster.environment import free_port

    master = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    args = ["run", str(job_file), "--set", "cluster.kind=local", "--output-dir", str(run_dir), "--nnodes", "2"]
    other = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args, "--node-rank", "1", "--master", master],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert_ok(sharpen(*args, "--node-rank", "0", "--master", master))
        out, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    assert other.returncode == 0, out
    assert_same_losses(losses(run_dir), local_losses)
    bad = sharpen(*args, "--node-rank", "1", "--master", "no-such-host.invalid:29500")
    assert bad.returncode == 2 and "cannot resolve 'no-such-host.invalid'" in bad.stderr


@pytest.mark.slurm
def test_a_refused_requeue_is_said_and_not_counted(cluster, tmp_path):
    """`scontrol requeue` of a job SLURM does not know: the reason comes back, the count is given back."""
    from cluster.requeue import requeue, write_requeue_count

    write_requeue_count(tmp_path, 1)
    failure = requeue(tmp_path, "999999")
    assert failure is not None and "`scontrol requeue 999999` failed" in failure and "sharpen submit" in failure
    assert read_requeue_count(tmp_path) == 0
