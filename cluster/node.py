"""Inside a SLURM job: find the head node's address, then start this node's ranks (launch: agent).

    python -m cluster.node RUN_DIR                       # one srun task per node (the default launch)
    python -m cluster.node --task-environment RUN_DIR    # prints `export` lines for launch: task_per_rank

Everything is read from SLURM's variables here, inside the job, so the batch script holds no `$SLURM_*`
arithmetic a user would have to escape. The head is the first host of the allocation; its address is
the NodeAddr SLURM reaches it by (a node's name need not resolve, as on the test cluster).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from cluster.environment import SlurmJob, slurm_head_node, slurm_job
from cluster.local import launch, worker_environment
from cluster.slurm import STOP_FILE, TERM_FILE
from launcher.plan import Plan

# Rendezvous ports: derived from the job id, so every node computes the same one without talking, and two
# jobs sharing a head node rarely meet. Below Linux's ephemeral range (32768+), which outgoing connections use.
PORT_BASE, PORT_SPAN = 15000, 15000


def node_address(name: str) -> str:
    """The address SLURM reaches node `name` at (NodeAddr), or the name itself."""
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "node", name], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return name
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else name


def rendezvous_endpoint(job: SlurmJob) -> tuple[str, int]:
    """(address of the first node, port) for this job, the same on every node."""
    return node_address(slurm_head_node()), PORT_BASE + int(job.job_id) % PORT_SPAN


def this_job() -> SlurmJob:
    """The SLURM job of this node's task; exits with a message outside one."""
    job = slurm_job()
    if job is None or not job.num_nodes or job.node_id is None:
        sys.exit(
            "error: SLURM_JOB_ID, SLURM_JOB_NUM_NODES and SLURM_NODEID must be set: "
            "`python -m cluster.node` runs inside a SLURM job (srun)"
        )
    return job


def take_stop_signals(run_dir: Path, node_rank: int, stop_signal: str) -> None:
    """The stop signal (cluster.slurm.signal, USR2 by default) and SIGTERM that reach this node's agent
    (`scancel --signal=USR2 JOB`, a preemption) become the
    requests the batch script's trap writes: files rank 0 reads at its next step (training/preemption.py).
    The agent does not stop its ranks on SIGTERM: they checkpoint within the grace period and stop
    themselves; SLURM's SIGKILL ends whatever is left."""

    def request(path: Path, what: str, first_only: bool):
        def handler(_signum, _frame) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if first_only and path.exists():
                return
            path.touch()
            os.write(2, f"sharpen: node {node_rank}: {what}\n".encode())  # not print: this runs between any two bytecodes

        return handler

    stop = request(run_dir / STOP_FILE, f"{stop_signal}: checkpointing at the next step, then requeueing", False)
    signal.signal(getattr(signal, f"SIG{stop_signal}"), stop)
    signal.signal(signal.SIGTERM, request(run_dir / TERM_FILE, "SIGTERM: stopping at the next step", True))


def run_node(run_dir: Path) -> int:
    """Start this node's ranks under the elastic agent; returns their exit status."""
    job = this_job()
    plan = Plan.read(run_dir)
    take_stop_signals(run_dir, job.node_id, plan.spec.cluster.slurm.signal)
    job_id, nnodes, node_rank = job.job_id, job.num_nodes, job.node_id
    if nnodes != plan.nnodes:
        print(
            f"error: the job has {nnodes} node(s) but the plan was made for {plan.nnodes}; "
            "submit it again with `sharpen submit` rather than editing the sbatch script",
            file=sys.stderr,
        )
        return 2
    host, port = rendezvous_endpoint(job)
    restart = job.restart_count
    print(f"sharpen: node {node_rank} of {nnodes}: rendezvous at {host}:{port} (job {job_id})", file=sys.stderr, flush=True)
    quiet_agent_shutdown()
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        return launch(
            run_dir,
            nproc_per_node=plan.nproc_per_node,
            device=plan.device,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=f"{host}:{port}",
            run_id=f"sharpen-{job_id}-{restart}",
            join_timeout_s=plan.spec.cluster.rendezvous_timeout_s,
            agent_signals="SIGINT,SIGHUP,SIGQUIT",  # SIGTERM and the stop signal are take_stop_signals'
        )
    except SignalException as exc:  # scancel, requeue, a failed rank on another node: SLURM ends the step
        print(f"sharpen: node {node_rank}: ranks stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)


def quiet_agent_shutdown() -> None:
    """Silence one harmless race at the end of every multi-node run: the node hosting the c10d store may
    exit before another node's agent closes the rendezvous, whose failure torch reports as a warning with
    a C++ stack trace. Only this agent process is quieted (its C++ log level is read when torch loads);
    the ranks it starts keep the default."""
    import logging

    saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    import torch  # noqa: F401

    if saved is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = saved
    logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous").setLevel(logging.ERROR)


def task_environment(run_dir: Path) -> dict[str, str]:
    """What every rank of launch: task_per_rank needs besides SLURM's own variables."""
    plan = Plan.read(run_dir)
    job = slurm_job()
    host, port = rendezvous_endpoint(job)
    env = worker_environment(plan.device, plan.nproc_per_node)
    if "OMP_NUM_THREADS" not in os.environ and job.cpus_per_task:
        env["OMP_NUM_THREADS"] = str(job.cpus_per_task)
    return {**env, "MASTER_ADDR": host, "MASTER_PORT": str(port)}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--task-environment":
        for key, value in task_environment(Path(argv[1])).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    return run_node(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
