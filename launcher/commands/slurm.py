"""`sharpen submit | status | logs | cancel`: a run as a SLURM job, and following it from the login node."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from launcher.errors import UserError

FOLLOW_POLL_S = 0.5
FOLLOW_STATE_EVERY_S = 2.0


def register(subparsers) -> None:
    """Add the SLURM commands to the `sharpen` subcommand parser."""
    p = subparsers.add_parser("submit", help="run the job on SLURM: write the run dir and sbatch script, submit it")
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a job key")
    p.add_argument("--output-dir", help="run directory (default: output_dir from the job, else runs/NAME-TIME)")
    p.add_argument("--dry-run", action="store_true", help="prepare everything and write the script, but do not sbatch")

    p = subparsers.add_parser("status", help="where a submitted run is: SLURM's state and training progress")
    p.add_argument("run_dir")
    p = subparsers.add_parser("logs", help="print a submitted run's log (the job's, or one rank's)")
    p.add_argument("run_dir")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--rank", type=int, help="this rank's log instead of the job's")
    p = subparsers.add_parser("cancel", help="cancel a submitted run (scancel; it is not requeued)")
    p.add_argument("run_dir")


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster import slurm
    from cluster.requeue import write_requeue_count
    from launcher.jobfile import load_job
    from launcher.planner import default_run_dir
    from launcher.prepare import prepare_run

    spec = load_job(args.job, args.set)
    if not args.dry_run:
        slurm.require("sbatch")  # before any tokenizing
    if spec.cluster.kind != "slurm":
        spec.cluster.kind = "slurm"
    run_dir = (Path(args.output_dir) if args.output_dir else default_run_dir(spec)).resolve()
    if not args.dry_run and (run_dir / slurm.JOB_ID_FILE).is_file():
        old = slurm.read_job_id(run_dir)
        if slurm.is_active(slurm.job_state(old)):
            raise UserError(
                f"{run_dir} is already used by SLURM job {old}, which is still queued or running",
                f"follow it with `sharpen status {run_dir}`, or `sharpen cancel {run_dir}` first",
            )
    # On SLURM the plan is for the compute nodes, not this login node: `auto` means their GPUs.
    device = "cpu" if spec.device == "cpu" else "cuda"
    # Tokenized data inside the run dir unless the job names a cache: every node must read it.
    cache_root = spec.data.cache_dir or run_dir / "data_cache"
    plan = prepare_run(spec, run_dir, device=device, cache_root=cache_root, dry_run=args.dry_run)
    if spec.cluster.slurm.grace_s is None and (grace := slurm.site_grace_s(spec.cluster.slurm.partition)) is not None:
        plan = plan.model_copy(update={"stop_grace_s": grace})  # the site's, where the job names none
        plan.write(run_dir)
    script = slurm.write_sbatch(plan)
    slurm_spec = spec.cluster.slurm
    print(
        f"sharpen: {plan.nnodes} node(s) × {plan.nproc_per_node} rank(s) on {plan.device}, strategy {plan.strategy}, "
        f"launch {slurm_spec.launch}; script {script}",
        file=sys.stderr,
    )
    if args.dry_run:
        if plan.data_cache is None:  # the ranks would find no tokenized data: only a real submit makes it
            print("dry run: not submitted, data not tokenized; `sharpen submit` without --dry-run tokenizes and submits")
        else:
            print(f"dry run: not submitted; submit it with `sbatch {script}` or `sharpen submit` without --dry-run")
        return 0
    write_requeue_count(run_dir, 0)
    job_id = slurm.sbatch(script)
    (run_dir / slurm.JOB_ID_FILE).write_text(job_id + "\n")
    print(f"submitted SLURM job {job_id}; run dir {run_dir}")
    print(f"  follow it:  sharpen status {run_dir}   |   sharpen logs -f {run_dir}   |   sharpen cancel {run_dir}")
    return 0


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "plan.json").is_file():
        raise UserError(f"{run_dir}: not a sharpen run directory (no plan.json)")
    return run_dir


def progress_line(run_dir: Path) -> str:
    """Training progress from the run dir itself: last logged step and loss, newest checkpoint, final/."""
    from launcher.plan import Plan
    from training.checkpoint import latest_checkpoint

    max_steps = Plan.read(run_dir).spec.train.max_steps
    parts = []
    metrics = run_dir / "metrics.jsonl"
    rows = [line for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if rows:
        last = json.loads(rows[-1])
        parts.append(f"step {last['step']} of {max_steps}, loss {last['loss']:.4f}")
    else:
        parts.append(f"no step logged yet (of {max_steps})")
    latest = latest_checkpoint(run_dir)
    parts.append(f"newest checkpoint: step {latest[0]}" if latest else "no checkpoint yet")
    if (run_dir / "final").is_dir():
        parts.append(f"output in {run_dir / 'final'}")
    return "; ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    from cluster import slurm
    from cluster.requeue import read_requeue_count
    from launcher.plan import Plan

    run_dir = _run_dir(args.run_dir)
    job_id = slurm.read_job_id(run_dir)
    state = slurm.job_state(job_id)
    max_requeues = Plan.read(run_dir).spec.cluster.slurm.max_requeues
    if state is None:
        print(f"job {job_id}: no longer known to SLURM (finished before the controller's memory, no accounting)")
    else:
        where = f" on {state['nodes']}" if state["nodes"] and state["nodes"] != "(null)" else ""
        reason = f", reason {state['reason']}" if state["reason"] not in ("", "None", "(null)") else ""
        exit_code = f", exit code {state['exit_code']}" if state["exit_code"] and not slurm.is_active(state) else ""
        print(f"job {job_id}: {state['state']}{where}, elapsed {state['elapsed'] or '0:00'} of {state['limit']}{reason}{exit_code}")
    print(f"requeues: {read_requeue_count(run_dir)} of {max_requeues}")
    print(f"progress: {progress_line(run_dir)}")
    print(f"log: {slurm.log_path(run_dir, job_id)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from cluster import slurm

    run_dir = _run_dir(args.run_dir)
    job_id = slurm.read_job_id(run_dir)
    path = run_dir / "logs" / f"rank-{args.rank}.log" if args.rank is not None else slurm.log_path(run_dir, job_id)
    if not args.follow:
        if not path.is_file():
            raise UserError(f"{path} does not exist yet", f"is the job running? `sharpen status {run_dir}`")
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    follow(path, job_id)
    return 0


def follow(path: Path, job_id: str) -> None:
    """Print `path` as it grows until the job has ended (or Ctrl-C)."""
    from cluster import slurm

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
            # Read the file once more after the job ended, for the lines written in its last moments.
            active = slurm.is_active(slurm.job_state(job_id))
            next_check = time.monotonic() + FOLLOW_STATE_EVERY_S
            if not active:
                continue
        time.sleep(FOLLOW_POLL_S)


def cmd_cancel(args: argparse.Namespace) -> int:
    from cluster import slurm

    run_dir = _run_dir(args.run_dir)
    job_id = slurm.read_job_id(run_dir)
    state = slurm.job_state(job_id)
    if not slurm.is_active(state):
        now = state["state"] if state else "no longer known to SLURM"
        print(f"job {job_id} is not queued or running ({now}): nothing to cancel")
        return 0
    slurm.scancel(job_id)
    print(f"cancelled SLURM job {job_id} (a cancelled job is not requeued); checkpoints stay in {run_dir / 'checkpoints'}")
    return 0


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel}
