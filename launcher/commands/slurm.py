"""`sharpen submit`: a run as a SLURM job (follow it with `sharpen status | logs | cancel`, commands/runs.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.errors import UserError


def register(subparsers) -> None:
    """Add the SLURM commands to the `sharpen` subcommand parser."""
    p = subparsers.add_parser("submit", help="run the job on SLURM: write the run dir and sbatch script, submit it")
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a job key")
    p.add_argument("--output-dir", help="run directory (default: output_dir from the job, else runs/NAME-TIME)")
    p.add_argument("--dry-run", action="store_true", help="prepare everything and write the script, but do not sbatch")


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


COMMANDS = {"submit": cmd_submit}
