"""`sharpen status | logs | cancel | runs`: follow any run, local or submitted to SLURM, from its run dir
(launcher/run_state.py reads where it is)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from launcher.errors import UserError

FOLLOW_POLL_S = 0.5
FOLLOW_STATE_EVERY_S = 2.0
CANCEL_WAIT_S = 60.0


def register(subparsers) -> None:
    """Add these commands to the `sharpen` subcommand parser."""
    p = subparsers.add_parser("status", help="where a run is: state, step, loss, tokens/s, ETA (local or SLURM)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print one JSON object (stable key names)")
    p = subparsers.add_parser("logs", help="print a run's log (rank 0's, the SLURM job's, or one rank's)")
    p.add_argument("run_dir")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    p.add_argument("--rank", type=int, help="this rank's log")
    p = subparsers.add_parser("cancel", help="stop a run: scancel a SLURM job, SIGTERM a local launcher")
    p.add_argument("run_dir")
    p = subparsers.add_parser("runs", help="the runs under a directory as a table: state, step, loss, wall time")
    p.add_argument("dir", nargs="?", default="runs", help="where to look (default: runs/)")
    p.add_argument("--json", action="store_true", help="one JSON object per run, in a list")


def cmd_status(args: argparse.Namespace) -> int:
    from launcher.run_state import read_state

    info = read_state(args.run_dir)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
        return 0
    for line in status_lines(info):
        print(line)
    return 0


def status_lines(info) -> list[str]:
    """What `sharpen status` prints: the run, its state, SLURM's view of the job, progress, the log."""
    from launcher.run_state import progress_lines

    lines = [
        f"run: {info.name} ({info.method}, {info.finetune}, {info.strategy}, {info.ranks} rank(s)) in {info.run_dir}",
        f"state: {info.state}" + (f" ({info.detail})" if info.detail else ""),
    ]
    if info.slurm is not None:
        lines += slurm_lines(info)
    elif info.pid is not None and info.state == "running":
        lines.append(f"launcher: pid {info.pid} on {info.host}")
    return lines + progress_lines(info) + [f"log: {info.log}"]


def slurm_lines(info) -> list[str]:
    from cluster import slurm
    from launcher.plan import Plan

    job = info.slurm
    max_requeues = Plan.read(info.run_dir).spec.cluster.slurm.max_requeues
    if "state" not in job:
        head = f"job {job['job_id']}: no longer known to SLURM (finished before the controller's memory, no accounting)"
    else:
        where = f" on {job['nodes']}" if job["nodes"] and job["nodes"] != "(null)" else ""
        reason = f", reason {job['reason']}" if job["reason"] not in ("", "None", "(null)") else ""
        exit_code = f", exit code {job['exit_code']}" if job["exit_code"] and not slurm.is_active(job) else ""
        head = f"job {job['job_id']}: {job['state']}{where}, elapsed {job['elapsed'] or '0:00'} of {job['limit']}"
        head += reason + exit_code
    return [head, f"requeues: {job['requeues']} of {max_requeues}"]


def still_running(run_dir: Path):
    """A function answering whether the run can still write to its logs: the SLURM job queued or running
    (a requeued job passes through these), or the local launcher alive."""
    from cluster import slurm
    from launcher.run_state import is_slurm, launcher_alive, read_launch

    launch = read_launch(run_dir)
    if is_slurm(run_dir, launch):
        job_id = slurm.read_job_id(run_dir)
        return lambda: slurm.is_active(slurm.job_state(job_id))

    def local() -> bool:
        now = read_launch(run_dir)
        return now is not None and not now.get("outcome") and launcher_alive(now) is not False

    return local


def cmd_logs(args: argparse.Namespace) -> int:
    from launcher.run_state import default_log, is_slurm, read_launch, run_dir_of

    run_dir = run_dir_of(args.run_dir)
    if args.rank is not None:
        path = run_dir / "logs" / f"rank-{args.rank}.log"
    else:
        path = default_log(run_dir, is_slurm(run_dir, read_launch(run_dir)))
    running = still_running(run_dir)
    if not path.is_file() and not (args.follow and running()):
        raise UserError(f"{path} does not exist yet", f"is the run running? `sharpen status {run_dir}`")
    if not args.follow:
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    follow(path, running)
    return 0


def follow(path: Path, running) -> None:
    """Print `path` as it grows until `running()` is false (or Ctrl-C)."""
    offset, next_check, active = 0, 0.0, True
    while True:
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if not active:
            return
        if time.monotonic() >= next_check:
            # Read the file once more after the run ended, for the lines written in its last moments.
            active = running()
            next_check = time.monotonic() + FOLLOW_STATE_EVERY_S
            if not active:
                continue
        time.sleep(FOLLOW_POLL_S)


def cmd_cancel(args: argparse.Namespace) -> int:
    from launcher.run_state import is_slurm, read_launch, run_dir_of

    run_dir = run_dir_of(args.run_dir)
    launch = read_launch(run_dir)
    if is_slurm(run_dir, launch):
        return cancel_slurm(run_dir)
    return cancel_local(run_dir, launch)


def cancel_slurm(run_dir: Path) -> int:
    from cluster import slurm

    job_id = slurm.read_job_id(run_dir)
    state = slurm.job_state(job_id)
    if not slurm.is_active(state):
        now = state["state"] if state else "no longer known to SLURM"
        print(f"job {job_id} is not queued or running ({now}): nothing to cancel")
        return 0
    slurm.scancel(job_id)
    print(f"cancelled SLURM job {job_id} (a cancelled job is not requeued); checkpoints stay in {run_dir / 'checkpoints'}")
    return 0


def cancel_local(run_dir: Path, launch: dict | None) -> int:
    """SIGTERM to the local launcher, which stops its ranks (the newest complete checkpoint stays)."""
    from launcher.run_state import launcher_alive, read_state

    if launch is None:
        raise UserError(f"{run_dir}: no launch.json: this run was not started by `sharpen run` here, or never")
    alive = launcher_alive(launch) if not launch.get("outcome") else False
    if alive is None:
        raise UserError(f"{run_dir} runs on {launch.get('host')}", f"run `sharpen cancel {run_dir}` there")
    if not alive:
        print(f"{run_dir} is not running ({read_state(run_dir).state}): nothing to cancel")
        return 0
    os.kill(int(launch["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + CANCEL_WAIT_S
    while launcher_alive(launch) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = "it has stopped" if not launcher_alive(launch) else f"it is still stopping after {CANCEL_WAIT_S:.0f} s"
    print(f"sent SIGTERM to the launcher (pid {launch['pid']}): {ended}; checkpoints stay in "
          f"{run_dir / 'checkpoints'}; continue with `sharpen resume {run_dir}`")  # fmt: skip
    return 0


COLUMNS = ("name", "method", "fine-tune", "strategy", "ranks", "state", "step", "final loss", "wall time")


def cmd_runs(args: argparse.Namespace) -> int:
    from launcher.run_state import duration, find_runs, read_state

    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory", "name the directory your runs are in: `sharpen runs DIR`")
    query_slurm = shutil.which("squeue") is not None
    states = []
    for run_dir in find_runs(root):
        try:
            states.append(read_state(run_dir, query_slurm=query_slurm))
        except UserError as exc:
            print(f"note: skipping {run_dir}: {exc}", file=sys.stderr)
    states.sort(key=lambda s: s.started_at or "")
    if args.json:
        print(json.dumps([s.to_json() for s in states], indent=2))
        return 0
    if not states:
        print(f"no runs under {root} (a run dir has a plan.json)")
        return 0
    rows = []
    for s in states:
        name = Path(s.run_dir).resolve().relative_to(root.resolve()).as_posix()
        step = f"{s.step if s.step is not None else 0}/{s.max_steps}"
        loss = f"{s.loss:.4f}" if s.loss is not None else "-"
        rows.append((name, s.method, s.finetune, s.strategy, str(s.ranks), s.state, step, loss, duration(s.elapsed_s)))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    for row in (COLUMNS, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


COMMANDS = {"status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel, "runs": cmd_runs}
