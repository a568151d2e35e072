"""Checkpoints that survive crashes: exact resume after a real kill -9, damaged checkpoints, wrong jobs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from support.e2e import ALPACA, assert_ok, base_job, losses, metrics, sharpen, write_job

from training.env_hooks import FAULT, RDZV_CONNECT_TIMEOUT_S

STEPS = 6


def job_for(model: Path, finetune: str, strategy: str, ranks: int = 2, **extra) -> dict:
    sections = {
        "finetune": {"type": finetune, "r": 8, "alpha": 16, "dropout": 0.1},
        "train": {"max_steps": STEPS, "save_every": 2, "keep_last": 2, "lr": 2.0e-3},
        "strategy": {"name": strategy},
        "resources": {"gpus_per_node": ranks},
    }
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    return base_job(model, ALPACA, **sections)


def run(tmp_path: Path, name: str, job: dict, fault: str | None = None, env: dict | None = None):
    run_dir = tmp_path / name
    job_file = write_job(tmp_path / f"{name}.yaml", job)
    env = {**(env or {}), **({FAULT: fault} if fault else {})}
    return run_dir, sharpen("run", str(job_file), "--output-dir", str(run_dir), env=env)


def assert_same_losses(got: list[float], want: list[float], rel: float = 1e-6) -> None:
    assert len(got) == len(want), (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=rel), f"step {step}: resumed {g} vs uninterrupted {w}"


@pytest.mark.parametrize(
    "finetune,strategy",
    # fsdp full is resumed (from a kill mid-save) and compared the same way below; ddp, fsdp LoRA and zero3
    # full are resumed after a hang the watch stopped (test_a_hung_rank_is_named_stopped_and_resumed); zero2's
    # checkpoints are resumed, on another world size too, by test_resharding.py.
    [("lora", "zero3")],
)
def test_resume_after_kill_equals_uninterrupted_run(tiny_model, tmp_path, finetune, strategy):
    """kill -9 of every rank after step 3 (checkpoint at 2); `sharpen resume` ends with the same losses,
    step for step, as a run that was never stopped (LoRA dropout on, so RNG state matters too)."""
    job = job_for(tiny_model, finetune, strategy)
    straight_dir, result = run(tmp_path, "straight", job)
    assert_ok(result)

    crashed_dir, result = run(tmp_path, "crashed", job, fault="kill-after-step:3")
    assert result.returncode == 1, result.stderr
    assert "SIGKILL" in result.stderr
    assert [r["step"] for r in metrics(crashed_dir)] == [1, 2, 3]

    result = sharpen("resume", str(crashed_dir))
    assert_ok(result)
    assert "resuming from it" in result.stderr and "step 2" in result.stderr
    assert_same_losses(losses(crashed_dir), losses(straight_dir))
    assert [r["step"] for r in metrics(crashed_dir)] == list(range(1, STEPS + 1))


HANG_TIMEOUT_S = 10


@pytest.mark.parametrize("finetune,strategy", [("full", "ddp"), ("lora", "fsdp"), ("full", "zero3")])
def test_a_hung_rank_is_named_stopped_and_resumed(tiny_model, tmp_path, finetune, strategy):
    """Rank 1 stops making progress after step 3 (checkpoint at 2) and rank 0 waits for it in the next
    collective. The watch must stop the run within the timeout + 60 s, exit 1, name rank 1 and the
    function it is stuck in and rank 0's collective, leave no process behind, and `sharpen resume` must
    end with the uninterrupted losses."""
    import psutil

    job = job_for(tiny_model, finetune, strategy, train={"hang_timeout_s": HANG_TIMEOUT_S})
    straight_dir, result = run(tmp_path, "straight", job)
    assert_ok(result)

    hung_dir, result = run(tmp_path, "hung", job, fault="hang-after-step:3@1")
    ended = time.time()
    assert result.returncode == 1, result.stderr
    stuck_since = (hung_dir / "metrics.jsonl").stat().st_mtime  # rank 0 logged step 3, then waited
    assert ended - stuck_since < HANG_TIMEOUT_S + 60
    report = result.stderr[result.stderr.index("error: the run hung"):]
    assert f"no rank made progress for {HANG_TIMEOUT_S}" in report or f"for {HANG_TIMEOUT_S + 1} s" in report, report
    assert "rank 1 stopped first, after step 3 (training): in maybe_hang (training/faults.py:" in report, report
    assert "rank 0 at step 4" in report and "waiting in a collective" in report.split("rank 0 at step 4")[1], report
    assert "newest complete checkpoint is step-2" in report and "Traceback" not in result.stderr
    assert "maybe_hang" in (hung_dir / "logs" / "rank-1.log").read_text()  # faulthandler's stack, in its log
    pids = [json.loads(p.read_text())["pid"] for p in (hung_dir / "logs" / "heartbeat").glob("rank-*.json")]
    assert len(pids) == 2 and not any(psutil.pid_exists(pid) for pid in pids)
    assert [r["step"] for r in metrics(hung_dir)] == [1, 2, 3]

    assert_ok(sharpen("resume", str(hung_dir)))
    assert_same_losses(losses(hung_dir), losses(straight_dir))


def test_one_rank_killed_stops_the_run_quickly(tiny_model, tmp_path):
    """kill -9 of rank 1 alone: rank 0 is left in a collective; the launcher must stop it and exit 1."""
    job = job_for(tiny_model, "full", "ddp", train={"max_steps": 40, "save_every": 0})
    start = time.monotonic()
    run_dir, result = run(tmp_path, "killed", job, fault="kill-after-step:2@1")
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert "rank 1 failed" in result.stderr and "SIGKILL" in result.stderr
    assert elapsed < 60, f"the launcher took {elapsed:.0f}s to give up"
    assert "Traceback" not in result.stderr.split("last lines of its log")[0]


def test_one_rank_killed_is_reported_and_resumes(tiny_model, tmp_path):
    """One CPU rank is forked from the launcher rather than spawned by the agent: a kill -9 of it is still
    reported by rank with its signal, exit 1, and `sharpen resume` ends with the uninterrupted losses."""
    job = job_for(tiny_model, "lora", "single", ranks=1)
    straight_dir, result = run(tmp_path, "straight", job)
    assert_ok(result)
    crashed_dir, result = run(tmp_path, "crashed", job, fault="kill-after-step:3")
    assert result.returncode == 1
    assert "rank 0 failed (killed by SIGKILL)" in result.stderr and "Traceback" not in result.stderr
    assert [r["step"] for r in metrics(crashed_dir)] == [1, 2, 3]
    status = sharpen("status", str(crashed_dir))
    assert "state: failed (rank 0 failed (killed by SIGKILL))" in status.stdout, status.stdout
    assert f"step 3 of {STEPS}, loss {losses(crashed_dir)[-1]:.4f}" in status.stdout and "checkpoint: step 2" in status.stdout
    assert_ok(sharpen("resume", str(crashed_dir)))
    assert_same_losses(losses(crashed_dir), losses(straight_dir))
    table = sharpen("runs", str(tmp_path)).stdout.splitlines()
    assert [row.split()[:7] for row in table[1:]] == [
        ["straight", "sft", "lora", "single", "1", "finished", f"{STEPS}/{STEPS}"],
        ["crashed", "sft", "lora", "single", "1", "finished", f"{STEPS}/{STEPS}"],
    ], table


def test_sigterm_to_the_launcher_stops_its_one_rank(tiny_model, tmp_path):
    """SIGTERM to `sharpen run` (`sharpen cancel`, a scheduler, `kill`): passed on to the rank as the agent
    does, reported without a traceback, exit 1, and no process left behind. `sharpen status` says running,
    with its step, while it runs, and stopped after."""
    import os
    import subprocess
    import sys

    import psutil
    from support.e2e import REPO

    job = job_for(tiny_model, "lora", "single", ranks=1, train={"max_steps": 100_000, "save_every": 0})
    job_file, run_dir = write_job(tmp_path / "long.yaml", job), tmp_path / "long"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "run", str(job_file), "--output-dir", str(run_dir)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 300
    while len(metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []) < 2 and launcher.poll() is None \
            and time.monotonic() < deadline:  # fmt: skip
        time.sleep(0.1)
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    assert len(ranks) == 1
    running = json.loads(sharpen("status", str(run_dir), "--json").stdout)
    assert (running["state"], running["pid"], running["max_steps"]) == ("running", launcher.pid, 100_000)
    assert running["step"] >= 2 and running["tokens_per_s"] > 0 and running["eta_s"] > 0, running
    cancel = sharpen("cancel", str(run_dir))  # SIGTERM to the launcher's pid
    _, stderr = launcher.communicate(timeout=120)
    assert f"sent SIGTERM to the launcher (pid {launcher.pid}): it has stopped" in cancel.stdout, cancel.stdout
    assert launcher.returncode == 1, stderr
    assert "rank 0 failed (killed by SIGTERM)" in stderr and "Traceback" not in stderr
    assert not ranks[0].is_running()
    status = sharpen("status", str(run_dir))
    assert "state: stopped (by SIGTERM to the launcher (sharpen cancel, kill))" in status.stdout, status.stdout


def test_kill_during_save_resumes_from_the_previous_checkpoint(tiny_model, tmp_path):
    job = job_for(tiny_model, "full", "fsdp")
    straight_dir, result = run(tmp_path, "straight", job)
    assert_ok(result)
    run_dir, result = run(tmp_path, "in-save", job, fault="kill-in-save:4")
    assert result.returncode == 1
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-2", "step-4.tmp"], names

    result = sharpen("resume", str(run_dir))
    assert_ok(result)
    assert "ignoring" in result.stderr and "step-4.tmp" in result.stderr
    assert "complete checkpoint at step 2" in result.stderr
    assert_same_losses(losses(run_dir), losses(straight_dir))
    assert not (run_dir / "checkpoints" / "step-4.tmp").exists()


# Secrets in the environment of the runs that log to trackers: none may reach a tracker's parameters.
SECRETS = {"WANDB_API_KEY": "wandb-key-never-logged", "HF_TOKEN": "hf_token_never_logged"}


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory) -> Path:
    """A 2-rank fsdp run killed after step 3: checkpoint step-2 complete, resumable. It logs to W&B (offline),
    MLflow (its default store, sqlite:///RUN/mlflow.db) and TensorBoard (RUN/tensorboard)."""
    tmp = tmp_path_factory.mktemp("stopped")
    logging = {"every": 1, "progress": False, "wandb": {"project": "t", "mode": "offline"}, "mlflow": {},
               "tensorboard": {}}
    job = job_for(tiny_model, "full", "fsdp", logging=logging)
    run_dir, result = run(tmp, "stopped", job, fault="kill-after-step:3", env={**SECRETS, "MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 1
    return run_dir


def snapshot(directory: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in directory.rglob("*") if p.is_file()}


def test_truncated_checkpoint_is_refused_naming_the_file(stopped_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    shard = max((run_dir / "checkpoints" / "step-2").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(run_dir)
    result = sharpen("resume", str(run_dir))
    assert result.returncode == 2
    assert shard.name in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run_dir) == before, "a refused resume must not touch the run dir"


def test_corrupted_checkpoint_is_refused(stopped_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    shard = next((run_dir / "checkpoints" / "step-2").rglob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = sharpen("resume", str(run_dir))
    assert result.returncode == 2
    assert shard.name in result.stderr and "corrupted" in result.stderr


def test_resume_with_another_job_lists_the_differences(stopped_run):
    result = sharpen("resume", str(stopped_run), "--set", "finetune.type=lora", "--set", "method.train_on=all")
    assert result.returncode == 2
    assert "finetune.type: 'full' → 'lora'" in result.stderr
    assert "method.train_on: 'completion' → 'all'" in result.stderr


def test_resume_refuses_a_strategy_that_cannot_read_the_checkpoint(stopped_run):
    result = sharpen("resume", str(stopped_run), "--set", "strategy.name=zero2")
    assert result.returncode == 2
    assert "written by strategy fsdp" in result.stderr
    status = sharpen("status", str(stopped_run)).stdout  # the refused resume left the run as it was
    assert "state: failed (rank " in status and "killed by SIGKILL" in status and "step 3 of 6" in status, status


def test_resume_on_one_rank_continues_the_same_tracker_runs(stopped_run, tmp_path):
    """FSDP checkpoint from 2 ranks resumed on 1 (DCP reshards), continuing the same W&B run, the same MLflow
    run (each step logged once: step 3, redone after the checkpoint at 2, keeps its first value) and the same
    TensorBoard directory; what each holds is what metrics.jsonl says, step for step."""
    import shutil

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    mlflow_id = (run_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    assert [m.step for m in client.get_metric_history(mlflow_id, "loss")] == [1, 2, 3]
    assert client.get_run(mlflow_id).info.status == "RUNNING"  # killed: nobody could end it
    result = sharpen("resume", str(run_dir), "--set", "resources.gpus_per_node=1",
                     env={**SECRETS, "MLFLOW_TRACKING_URI": ""})
    assert_ok(result)
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 1
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (run_dir / "wandb_id").read_text().strip() == wandb_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(wandb_id in p.name for p in runs)

    assert (run_dir / "mlflow_run_id").read_text().strip() == mlflow_id
    run = client.get_run(mlflow_id)
    assert (run.info.status, run.info.run_name) == ("FINISHED", "stopped")
    assert client.get_experiment(run.info.experiment_id).name == "e2e"  # the job's name
    history = client.get_metric_history(mlflow_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert_same_losses([m.value for m in history], [r["loss"] for r in rows], rel=1e-5)
    params = run.data.params
    assert (params["job.train.max_steps"], params["strategy"], params["world_size"]) == (str(STEPS), "fsdp", "2")
    leaked = [k for k, v in params.items() if any(secret in v for secret in SECRETS.values())]
    assert not leaked and len(params) > 50

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, STEPS + 1))
    assert_same_losses([e.value for e in scalars], [r["loss"] for r in rows], rel=1e-5)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"MLflow run {mlflow_id}" in log and "alembic" not in log and "Creating initial MLflow" not in log


def test_resume_without_a_complete_checkpoint(tiny_model, tmp_path):
    job = job_for(tiny_model, "full", "single", ranks=1, train={"max_steps": 4, "save_every": 2})
    run_dir, result = run(tmp_path, "early", job, fault="kill-after-step:1")
    assert result.returncode == 1
    result = sharpen("resume", str(run_dir))
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr


def test_unreachable_rendezvous_fails_in_seconds_with_the_address(tiny_model, tmp_path):
    from cluster.environment import free_port

    job_file = write_job(tmp_path / "job.yaml", job_for(tiny_model, "full", "ddp"))
    endpoint = f"127.0.0.1:{free_port()}"  # nobody listens there
    start = time.monotonic()
    result = sharpen(
        "run", str(job_file), "--output-dir", str(tmp_path / "run"),
        "--nnodes", "2", "--node-rank", "1", "--master", endpoint,
        env={RDZV_CONNECT_TIMEOUT_S: "3"},
    )
    assert result.returncode == 2, result.stderr
    assert f"cannot reach the rendezvous at {endpoint}" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 30


def test_export_refuses_a_damaged_checkpoint(stopped_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    shard = next((run_dir / "checkpoints" / "step-2").rglob("*.distcp"))
    shard.write_bytes(b"")
    result = sharpen("export", str(run_dir), "--to", str(tmp_path / "out"))
    assert result.returncode == 2 and shard.name in result.stderr
    assert not (tmp_path / "out").exists()
