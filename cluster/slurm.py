"""SLURM: render RUN/slurm/job.sbatch from the Plan, submit it, and ask SLURM about the job.

Launch modes (cluster.slurm.launch):

- ``agent`` (default): one srun task per node runs ``python -m cluster.node RUN``, which starts that
  node's ranks through torch's elastic agent with c10d rendezvous on the first node (rdzv id = job id),
  exactly like ``sharpen run`` does on one machine. Why the default: the ranks are children of a
  process that outlives them, so a rank's failure is reported with its log tail and stops the others
  at once; the head address and ports are found inside the job, in Python, not by shell lines; GPU
  ordinals are set by the agent (LOCAL_RANK), not by whatever binding the cluster applies per task;
  and it is the same code path as a local run, tested on every CPU machine.
- ``task_per_rank``: srun starts one task per GPU running ``python -m training.worker RUN`` directly;
  cluster.environment maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to rank, local rank and world
  size. For clusters that forbid processes outside srun's accounting, or bind GPUs per task.

Time limits: ``--signal=B:USR2@signal_lead_s`` sends USR2 to the batch shell; its trap touches
RUN/slurm/stop, which rank 0 sees at its next step (training/preemption.py). USR2 sent to the job's steps
instead (`scancel --signal=USR2 JOB`, a site template's `--signal=USR2@lead`) reaches each node's agent,
which touches the same file (cluster/node.py), and the ranks, which remember it: every way ends in the
same checkpoint and requeue. SIGTERM (preemption, after which SLURM allows GraceTime + KillWait before
SIGKILL; a plain scancel, KillWait) is left to the ranks: the trap and the agents touch RUN/slurm/term,
and the ranks checkpoint at the next step boundary if it comes within cluster.slurm.grace_s, else stop
without one. Nobody requeues after SIGTERM: with PreemptMode=REQUEUE SLURM requeues the job itself, and
it resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.errors import UserError
from launcher.plan import Plan
from launcher.spec import SlurmSpec

SCRIPT = "slurm/job.sbatch"
JOB_ID_FILE = "slurm/job_id"
STOP_FILE = "slurm/stop"
TERM_FILE = "slurm/term"
LOG_PATTERN = "logs/slurm-%j.log"
SLURM_TIMEOUT_S = 60


def log_path(run_dir: Path, job_id: str) -> Path:
    return Path(run_dir) / LOG_PATTERN.replace("%j", job_id)


def wants_gpus(plan: Plan, slurm: SlurmSpec) -> bool:
    return plan.device == "cuda" and slurm.gpu_flag != "none"


def tasks_per_node(plan: Plan, slurm: SlurmSpec) -> int:
    return 1 if slurm.launch == "agent" else plan.nproc_per_node


def cpus_per_task(plan: Plan, slurm: SlurmSpec) -> int | None:
    """cluster.slurm.cpus_per_task is per rank; the agent's one task per node holds every rank's CPUs."""
    if slurm.cpus_per_task is None:
        return None
    return slurm.cpus_per_task * (plan.nproc_per_node if slurm.launch == "agent" else 1)


# The one translation from the job's words to sbatch's: (option, value from plan, slurm spec, run dir).
# None or False leaves the option out, True writes the bare flag.
SBATCH_OPTIONS: list[tuple[str, Callable[[Plan, SlurmSpec, str], Any]]] = [
    ("job-name", lambda p, s, r: p.spec.name),
    ("nodes", lambda p, s, r: p.nnodes),
    ("ntasks-per-node", lambda p, s, r: tasks_per_node(p, s)),
    ("gres", lambda p, s, r: f"gpu:{p.nproc_per_node}" if wants_gpus(p, s) and s.gpu_flag == "gres" else None),
    ("gpus-per-node", lambda p, s, r: p.nproc_per_node if wants_gpus(p, s) and s.gpu_flag == "gpus" else None),
    ("cpus-per-task", lambda p, s, r: cpus_per_task(p, s)),
    ("mem", lambda p, s, r: s.mem),
    ("time", lambda p, s, r: s.time),
    ("partition", lambda p, s, r: s.partition),
    ("account", lambda p, s, r: s.account),
    ("qos", lambda p, s, r: s.qos),
    ("constraint", lambda p, s, r: s.constraint),
    ("exclusive", lambda p, s, r: s.exclusive),
    ("output", lambda p, s, r: f"{r}/{LOG_PATTERN}"),
    ("error", lambda p, s, r: f"{r}/{LOG_PATTERN}"),
    ("open-mode", lambda p, s, r: "append"),  # a requeued job appends to the same log
    ("signal", lambda p, s, r: f"B:{s.signal}@{s.signal_lead_s}" if s.signal_lead_s else None),
    ("requeue", lambda p, s, r: s.requeue),
    ("no-requeue", lambda p, s, r: not s.requeue),
]


def sbatch_lines(plan: Plan) -> list[str]:
    slurm, run_dir = plan.spec.cluster.slurm, plan.run_dir
    lines = []
    for option, value_of in SBATCH_OPTIONS:
        value = value_of(plan, slurm, run_dir)
        if value is None or value is False:
            continue
        lines.append(f"#SBATCH --{option}" if value is True else f"#SBATCH --{option}={value}")
    for i, extra in enumerate(slurm.extra_sbatch):
        option = extra.strip().removeprefix("#SBATCH").strip()
        if not option.startswith("-") or "\n" in option:
            raise UserError(
                f"cluster.slurm.extra_sbatch.{i}: {extra!r} is not an sbatch option",
                "write options as sbatch takes them, e.g. --mail-type=END or --reservation=NAME",
            )
        lines.append(f"#SBATCH {option}")
    return lines


def render_sbatch(plan: Plan, python: str = sys.executable) -> str:
    """The whole batch script for `plan`. Its only inputs are the plan and the Python to run; secrets such
    as WANDB_API_KEY reach the job through the submitting environment (sbatch exports it), never this file."""
    slurm = plan.spec.cluster.slurm
    run_dir, py = shlex.quote(plan.run_dir), shlex.quote(python)
    srun = f"srun --kill-on-bad-exit=1 --ntasks-per-node={tasks_per_node(plan, slurm)}"
    cpus = cpus_per_task(plan, slurm)
    if cpus:
        srun += f" --cpus-per-task={cpus}"  # srun does not inherit it from sbatch in every SLURM version
    if slurm.launch == "agent":
        start = [
            "# One task per node: it finds the first node's address and starts this node's ranks there.",
            f'{srun} "$PYTHON" -m cluster.node "$RUN_DIR" &',
        ]
    else:
        start = [
            "# One task per rank; the rendezvous address is resolved once, here on the first node.",
            'eval "$("$PYTHON" -m cluster.node --task-environment "$RUN_DIR")"',
            f'{srun} "$PYTHON" -m training.worker "$RUN_DIR" &',
        ]
    setup = ["set -e", *slurm.setup, "set +e"] if slurm.setup else []
    body = [
        "#!/bin/bash",
        *sbatch_lines(plan),
        "",
        f"# Rendered by sharpen {__version__} from RUN/plan.json; `sharpen submit` writes it again.",
        *setup,
        f"RUN_DIR={run_dir}",
        f"PYTHON={py}",
        f"STOP_FILE=\"$RUN_DIR/{STOP_FILE}\"",
        f"TERM_FILE=\"$RUN_DIR/{TERM_FILE}\"",
        'rm -f "$STOP_FILE" "$TERM_FILE"',
        f"# {slurm.signal} comes signal_lead_s before the time limit (or from scancel --signal={slurm.signal}): the",
        "# ranks see this file at their next step, stop together, checkpoint, and rank 0 requeues the job.",
        f"trap 'echo \"sharpen: {slurm.signal}: checkpointing at the next step, then requeueing\"; touch \"$STOP_FILE\"' "
        f"{slurm.signal}",
        "# SIGTERM (preemption, scancel): the ranks checkpoint if a step ends within the grace period, then stop;",
        "# this shell waits for them. The file's time is the first SIGTERM's.",
        "trap 'echo \"sharpen: SIGTERM: stopping at the next step\"; [ -e \"$TERM_FILE\" ] || touch \"$TERM_FILE\"' TERM",
        'echo "sharpen: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        *start,
        "srun_pid=$!",
        "# A trapped signal interrupts `wait`; wait again until srun has really ended.",
        "while :; do",
        '    wait "$srun_pid"',
        "    status=$?",
        '    kill -0 "$srun_pid" 2>/dev/null || break',
        "done",
        'exit "$status"',
    ]
    return "\n".join(body) + "\n"


def write_sbatch(plan: Plan, python: str = sys.executable) -> Path:
    run_dir = Path(plan.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = run_dir / SCRIPT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_sbatch(plan, python))
    return path


def require(program: str) -> str:
    """The path of a SLURM client program, or a UserError saying it is not here."""
    found = shutil.which(program)
    if found is None:
        raise UserError(
            f"no {program} on PATH: this machine is not a SLURM login node (or SLURM's client tools are not loaded)",
            "run this where SLURM's commands work (`module load slurm` on some clusters); "
            "`sharpen submit --dry-run` only writes the script",
        )
    return found


def run_slurm(args: list[str]) -> subprocess.CompletedProcess:
    require(args[0])
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"`{' '.join(args)}` did not answer in {SLURM_TIMEOUT_S}s: is slurmctld reachable?") from exc


def sbatch(script: Path) -> str:
    """Submit `script`; returns the job id. sbatch's refusal is shown as it said it."""
    result = run_slurm(["sbatch", "--parsable", str(script)])
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise UserError(f"sbatch refused the job:\n  {message.replace(chr(10), chr(10) + '  ')}\n  script: {script}")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch answered {result.stdout.strip()!r}, not a job id")
    return job_id


def read_job_id(run_dir: Path) -> str:
    path = Path(run_dir) / JOB_ID_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no SLURM job was submitted from this run directory (no {JOB_ID_FILE})")
    return path.read_text().strip()


def job_state(job_id: str) -> dict[str, str] | None:
    """What SLURM knows of the job: squeue while queued or running, then scontrol (for MinJobAge), then
    sacct (where accounting is kept). Keys: state, elapsed, limit, nodes, reason, exit_code; None if unknown."""
    result = run_slurm(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%l|%N|%r"])
    line = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    if line:
        state, elapsed, limit, nodes, reason = (line.split("|") + [""] * 5)[:5]
        return {"state": state, "elapsed": elapsed, "limit": limit, "nodes": nodes, "reason": reason, "exit_code": ""}
    result = run_slurm(["scontrol", "-o", "show", "job", job_id])
    if result.returncode == 0 and "JobState=" in result.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return {
            "state": fields.get("JobState", "?"), "elapsed": fields.get("RunTime", ""),
            "limit": fields.get("TimeLimit", ""), "nodes": fields.get("NodeList", ""),
            "reason": fields.get("Reason", ""), "exit_code": fields.get("ExitCode", ""),
        }  # fmt: skip
    if shutil.which("sacct"):
        result = run_slurm(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Elapsed,Timelimit,NodeList,ExitCode"])
        rows = [r for r in result.stdout.strip().splitlines() if r] if result.returncode == 0 else []
        if rows:
            state, elapsed, limit, nodes, exit_code = (rows[-1].split("|") + [""] * 5)[:5]
            return {"state": state, "elapsed": elapsed, "limit": limit, "nodes": nodes, "reason": "", "exit_code": exit_code}
    return None


def is_active(state: dict[str, str] | None) -> bool:
    """Queued, running or about to run again (a requeued job passes through these)."""
    return state is not None and state["state"].split()[0] in (
        "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING",
    )  # fmt: skip


def scancel(job_id: str) -> None:
    result = run_slurm(["scancel", job_id])
    if result.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {(result.stderr or result.stdout).strip()}")


def site_grace_s(partition: str | None) -> float | None:
    """Half the seconds this site allows between SIGTERM and SIGKILL: the partition's GraceTime (preemption)
    plus KillWait, from scontrol; None when scontrol cannot tell (not a SLURM host)."""
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
        target = ["scontrol", "-o", "show", "partition"] + ([partition] if partition else [])
        partitions = subprocess.run(target, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    kill_wait = re.search(r"^KillWait\s*=\s*(\d+)", config.stdout, re.MULTILINE)
    if config.returncode != 0 or kill_wait is None:
        return None
    grace = 0
    for line in partitions.stdout.splitlines() if partitions.returncode == 0 else []:
        if partition or "Default=YES" in line:
            found = re.search(r"\bGraceTime=(\d+)", line)
            grace = int(found.group(1)) if found else 0
            break
    return (grace + int(kill_wait.group(1))) / 2
