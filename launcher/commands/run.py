"""`sharpen plan | run | resume | schema`: a job planned, or run on this machine (N local ranks)."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from launcher.errors import UserError

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub) -> None:
    """Add these commands to the `sharpen` subcommand parser."""

    def job_command(name: str, help_text: str):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job", help="the job file (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a job key")
        return p

    p = job_command("plan", "show the resolved plan and memory per rank; nothing runs")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--output-dir", help="the run directory the plan is for")

    p = job_command("run", "train on this machine (N local ranks)")
    p.add_argument("--output-dir", help="run directory (default: output_dir from the job, else runs/NAME-TIME)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in a multi-node run without SLURM (run on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index; node 0 hosts the rendezvous")
    p.add_argument("--master", metavar="HOST:PORT", help="node 0's address and a free port (multi-node)")

    p = sub.add_parser("resume", help="continue a run from its newest complete checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")

    sub.add_parser("schema", help="print the job file's JSON schema (for editors)")


def cmd_plan(args) -> int:
    from launcher.jobfile import load_job
    from launcher.planner import build_plan, default_run_dir
    from launcher.report import print_plan

    spec = load_job(args.job, args.set)
    run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(spec)
    plan, notices = build_plan(spec, run_dir, anywhere=True)
    if args.json:
        print(plan.model_dump_json(indent=2))
    else:
        for n in notices:
            print(f"note: {n}", file=sys.stderr)
        print_plan(plan)
    return EXIT_OK


def cmd_run(args) -> int:
    from launcher.jobfile import load_job
    from launcher.planner import default_run_dir

    spec = load_job(args.job, args.set)
    run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(spec)
    return start_local(spec, run_dir, **multinode_launch(args, spec))


def cmd_resume(args) -> int:
    import pydantic

    from launcher.jobfile import apply_overrides, format_errors, validate
    from launcher.plan import Plan
    from training.checkpoint import latest_checkpoint

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    previous = Plan.read(run_dir)
    if latest_checkpoint(run_dir) is None:
        raise UserError(
            f"{run_dir}: no complete checkpoint to resume from",
            f"start it again with `sharpen run JOB.yaml --output-dir {run_dir}`",
        )
    try:
        spec = validate(apply_overrides(previous.job, args.set))
    except pydantic.ValidationError as exc:
        raise UserError(format_errors(exc, f"{run_dir} with its --set overrides")) from None
    return start_local(spec, run_dir, "resume")


def start_local(spec, run_dir: Path, command: str = "run", **multinode) -> int:
    """Prepare the run dir, start this node's ranks, report; RUN/launch.json says whether it runs and how it
    ended (launcher/run_state.py)."""
    import signal

    from torch.distributed.elastic.multiprocessing import SignalException

    from cluster.local import launch, read_failure
    from launcher import run_state
    from launcher.prepare import prepare_run

    plan = prepare_run(spec, run_dir, nnodes=multinode.get("nnodes"))
    print(
        f"sharpen: {plan.world_size} rank(s) on {plan.device}, strategy {plan.strategy}, "
        f"{plan.micro_batch_size}×{plan.grad_accum}×{plan.world_size} = {plan.global_batch_size} samples/step; "
        f"run dir {run_dir}",
        file=sys.stderr,
    )
    if multinode.get("node_rank", 0) != 0:  # node 0 keeps the run's launch.json
        rc = launch(run_dir, nproc_per_node=plan.nproc_per_node, device=plan.device, **multinode)
        return EXIT_OK if rc == 0 else EXIT_FAILED
    started = run_state.record_start(run_dir, command)
    rc, outcome, detail = EXIT_FAILED, run_state.FAILED, "the launcher stopped on an error"
    try:
        rc = launch(run_dir, nproc_per_node=plan.nproc_per_node, device=plan.device, **multinode)
        outcome, detail = run_state.outcome_of(rc, read_failure(run_dir))
    except KeyboardInterrupt:
        rc, outcome, detail = 130, run_state.STOPPED, run_state.stopped_by("SIGINT")
        raise
    except SignalException as exc:  # the elastic agent stopped the ranks on SIGTERM, SIGHUP, ...
        name = signal.Signals(exc.sigval).name
        rc, outcome, detail = EXIT_FAILED, run_state.STOPPED, run_state.stopped_by(name)
        print(f"sharpen: {name}: the ranks were stopped; resume with `sharpen resume {run_dir}`", file=sys.stderr)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise
    finally:
        run_state.record_end(run_dir, started, rc, outcome, detail)
    return EXIT_OK if rc == 0 else EXIT_FAILED


def cmd_schema(args) -> int:
    from launcher.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def multinode_launch(args: argparse.Namespace, spec) -> dict:
    """Keyword arguments for cluster.local.launch from `sharpen run --nnodes N --node-rank K --master HOST:PORT`
    ({} for a one-machine run). Node 0 hosts the c10d store at HOST:PORT; the rdzv id is the job's name."""
    nnodes = getattr(args, "nnodes", None) or 1
    if nnodes == 1:
        return {}
    if not args.master or ":" not in args.master or not args.master.rsplit(":", 1)[1].isdigit():
        raise UserError(
            f"--nnodes {nnodes} needs --master HOST:PORT: node 0's address and a free port, the same on every node"
        )
    if not 0 <= args.node_rank < nnodes:
        raise UserError(f"--node-rank {args.node_rank} must be between 0 and {nnodes - 1}")
    host = args.master.rsplit(":", 1)[0]
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise UserError(f"--master {args.master}: cannot resolve {host!r} ({exc})", "give node 0's IP address") from None
    return {
        "nnodes": nnodes, "node_rank": args.node_rank, "rdzv_endpoint": args.master, "run_id": f"sharpen-{spec.name}",
        "join_timeout_s": spec.cluster.rendezvous_timeout_s,
    }  # fmt: skip


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "resume": cmd_resume, "schema": cmd_schema}
