"""`sharpen status | runs` read a run's state from its run dir: the launcher alive or gone, how it ended,
step, loss, rate and ETA, in-process over run dirs laid out as `sharpen run` leaves them (the real runs'
dirs are read by tests/ranks/test_run.py and test_resume.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import run_state
from launcher.cli import main


def make_run(root: Path, name: str, *, max_steps: int = 10, steps: int = 0, every_s: float = 1.0,
             created: str = "2026-01-01T00:00:00") -> Path:  # fmt: skip
    """A run dir: plan.json with the fields a plan has, and `steps` logged steps `every_s` apart."""
    run_dir = root / name
    (run_dir / "logs").mkdir(parents=True)
    job = {"name": name, "method": {"kind": "sft"}, "finetune": {"type": "lora"}, "train": {"max_steps": max_steps}}
    plan = {"job": job, "strategy": "ddp", "world_size": 2, "created": created}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    rows = [
        {"step": s, "loss": 3.0 - 0.1 * s, "tokens_per_s": 100.0 * s, "elapsed_s": every_s * s} for s in range(1, steps + 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def finished_launch(run_dir: Path, outcome: str, detail: str = "", wall_s: float = 30.0) -> None:
    started = time.time() - 100
    run_state.write_launch(run_dir, {
        "pid": 1, "host": socket.gethostname(), "command": "run",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started + wall_s)),
        "first_started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "earlier_wall_s": 0.0, "exit_code": 0 if outcome == "finished" else 1, "outcome": outcome, "detail": detail,
    })  # fmt: skip


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_launcher_is_running_with_its_rate_and_eta(tmp_path):
    run_dir = make_run(tmp_path, "live", max_steps=10, steps=4, every_s=2.0)
    run_state.record_start(run_dir, "run")  # this process is the launcher
    info = run_state.read_state(run_dir)
    assert (info.state, info.step, info.max_steps, info.pid) == ("running", 4, 10, os.getpid())
    assert info.loss == pytest.approx(2.6)
    assert info.tokens_per_s == pytest.approx(250.0)  # the mean of the last logged steps' rates
    assert info.eta_s == pytest.approx(12.0)  # 6 steps left at 2 s a step
    assert info.log == str(run_dir / "logs" / "rank-0.log")
    lines = run_state.progress_lines(info)
    assert lines[0] == "progress: step 4 of 10, loss 2.6000"
    assert lines[1].startswith("speed: 250 tokens/s, ETA 12 s, elapsed ")


def test_a_launcher_gone_without_an_end_is_interrupted(tmp_path):
    run_dir = make_run(tmp_path, "gone", steps=3)
    pid = dead_pid()
    run_state.write_launch(run_dir, {"pid": pid, "host": socket.gethostname(), "started_at": run_state.now_iso()})
    info = run_state.read_state(run_dir)
    assert info.state == "failed" and f"interrupted: the launcher (pid {pid}) is gone" in info.detail
    assert info.eta_s is None


def test_a_launcher_that_ended_uncollected_is_not_running(tmp_path):
    """A zombie: the launcher has exited and its parent (here this test) has not yet waited for it."""
    run_dir = make_run(tmp_path, "zombie", steps=1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while run_state.proc_stat(child.pid)[0] != "Z":
            time.sleep(0.01)
        run_state.write_launch(run_dir, {"pid": child.pid, "host": socket.gethostname(), "started_at": run_state.now_iso()})
        assert run_state.read_state(run_dir).state == "failed"
    finally:
        child.wait()


def test_a_reused_pid_is_not_taken_for_the_launcher(tmp_path):
    run_dir = make_run(tmp_path, "reused", steps=1)
    launch = {"pid": os.getpid(), "pid_started": "1", "host": socket.gethostname(), "started_at": run_state.now_iso()}
    run_state.write_launch(run_dir, launch)
    assert run_state.read_state(run_dir).state == "failed"


def test_stale_heartbeats_of_a_live_launcher_say_it_may_be_hung(tmp_path):
    run_dir = make_run(tmp_path, "hung", steps=2)
    run_state.record_start(run_dir, "run")
    beats = run_dir / "logs" / "heartbeat"
    beats.mkdir()
    for rank in (0, 1):
        (beats / f"rank-{rank}.json").write_text(json.dumps({"last_advance": time.time() - 400, "limit_s": 300}))
    info = run_state.read_state(run_dir)
    assert info.state == "running" and "no rank has made progress for 400 s (hang limit 300 s)" in info.detail


def test_a_launcher_on_another_host_cannot_be_checked_here(tmp_path):
    run_dir = make_run(tmp_path, "elsewhere", steps=1)
    run_state.write_launch(run_dir, {"pid": os.getpid(), "host": "another-host", "started_at": run_state.now_iso()})
    info = run_state.read_state(run_dir)
    assert info.state == "running" and "another-host" in info.detail


@pytest.mark.parametrize(
    "code,failure,want",
    [
        (0, None, ("finished", "")),
        (3, None, ("stopped", "every rank stopped early on purpose (rank 0's log says why)")),
        (1, {"reason": "failed", "rank": 1, "exit": "killed by SIGKILL", "ends": ["SIGKILL", "SIGTERM"],
             "message": ""}, ("failed", "rank 1 failed (killed by SIGKILL)")),
        (1, {"reason": "failed", "rank": 0, "exit": "exit code 1", "ends": ["exit 1"],
             "message": "DiskFullError: no room"}, ("failed", "rank 0 failed (exit code 1): DiskFullError: no room")),
        (1, {"reason": "failed", "rank": 0, "exit": "killed by SIGTERM", "ends": ["SIGTERM"], "message": ""},
         ("stopped", "by SIGTERM to the launcher (sharpen cancel, kill)")),
        (1, {"reason": "hung", "message": "the run hung: no rank made progress for 10 s"},
         ("failed", "the run hung: no rank made progress for 10 s")),
    ],
)  # fmt: skip
def test_how_a_launcher_ended(code, failure, want):
    assert run_state.outcome_of(code, failure) == want


def test_a_resumed_run_takes_its_rate_from_this_launch_and_adds_up_its_wall_time(tmp_path):
    run_dir = make_run(tmp_path, "resumed", max_steps=8)
    rows = [{"step": s, "loss": 1.0, "tokens_per_s": 10.0, "elapsed_s": 10.0 * s} for s in (1, 2, 3)]
    rows += [{"step": s, "loss": 1.0, "tokens_per_s": 50.0, "elapsed_s": 1.0 * (s - 3)} for s in (4, 5, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    assert run_state.recent_rate(run_state.train_rows(run_dir)) == (50.0, 1.0)
    finished_launch(run_dir, "failed", wall_s=30.0)
    run_state.record_start(run_dir, "resume")
    assert run_state.read_launch(run_dir)["earlier_wall_s"] == pytest.approx(30.0, abs=1.0)
    info = run_state.read_state(run_dir)
    assert info.state == "running" and info.eta_s == pytest.approx(2.0) and info.elapsed_s >= 30.0


def test_runs_lists_every_run_dir_in_start_order(tmp_path, capsys):
    make_run(tmp_path, "b-second", steps=4, max_steps=4, created="2026-01-02T00:00:00")
    finished_launch(tmp_path / "b-second", "finished", wall_s=75.0)
    make_run(tmp_path / "group", "a-first", steps=2, max_steps=4, created="2025-12-31T00:00:00")
    (tmp_path / "notarun").mkdir()
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "method", "fine-tune", "strategy", "ranks", "state", "step", "final", "loss",
                                "wall", "time"]  # fmt: skip
    assert lines[1].split() == ["group/a-first", "sft", "lora", "ddp", "2", "unknown", "2/4", "2.8000", "2", "s"]
    assert lines[2].split() == ["b-second", "sft", "lora", "ddp", "2", "finished", "4/4", "2.6000", "1:15"]
    assert len(lines) == 3
    assert main(["runs", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["step"]) for r in rows] == [("a-first", "unknown", 2), ("b-second", "finished", 4)]


def test_runs_of_an_empty_or_missing_directory(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no runs under {tmp_path} (a run dir has a plan.json)\n"
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert f"error: {tmp_path / 'missing'}: no such directory" in capsys.readouterr().err


def test_status_logs_and_cancel_of_what_is_not_a_run_dir(tmp_path, capsys):
    for command in ("status", "logs", "cancel"):
        assert main([command, str(tmp_path)]) == 2
        assert f"error: {tmp_path}: not a sharpen run directory (no plan.json)" in capsys.readouterr().err


def test_cancel_of_an_ended_local_run_has_nothing_to_do(tmp_path, capsys):
    run_dir = make_run(tmp_path, "done", steps=4, max_steps=4)
    finished_launch(run_dir, "finished")
    assert main(["cancel", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"{run_dir} is not running (finished): nothing to cancel\n"


def test_slurm_elapsed_times():
    assert run_state.slurm_seconds("1-02:03:04") == 93784.0
    assert run_state.slurm_seconds("03:04") == 184.0
    assert run_state.slurm_seconds("") is None


def job(state: str, reason: str = "None", exit_code: str = "") -> dict[str, str]:
    """What cluster.slurm.job_state answers for a job (squeue's or sacct's fields)."""
    return {"state": state, "elapsed": "1:00", "limit": "1:00:00", "nodes": "n1", "reason": reason,
            "exit_code": exit_code}  # fmt: skip


@pytest.mark.parametrize(
    "answer,final,want",
    [
        (job("PENDING", "Resources"), False, ("queued", "waiting: Resources")),
        (job("RUNNING"), False, ("running", "")),
        (job("REQUEUED"), False, ("stopped", "stopped and requeued: it resumes from its checkpoint when SLURM "
                                             "starts it again")),
        (job("COMPLETED", exit_code="0:0"), True, ("finished", "")),
        (job("COMPLETED", exit_code="0:0"), False, ("stopped", "the job ended before max_steps (stopped early, "
                                                               "not requeued)")),
        (job("CANCELLED by 1000", exit_code="0:15"), False, ("stopped", "cancelled")),
        (job("PREEMPTED"), False, ("stopped", "preempted")),
        (job("FAILED", exit_code="3:0"), False, ("stopped", "stopped early, not requeued")),
        (job("OUT_OF_MEMORY", exit_code="0:125"), False, ("failed", "SLURM: OUT_OF_MEMORY, exit code 0:125")),
        (None, True, ("finished", "SLURM no longer knows the job; final/ is written")),
    ],
)  # fmt: skip
def test_what_slurm_says_of_the_job_is_the_runs_state(answer, final, want):
    assert run_state.job_run_state(answer, final) == want
