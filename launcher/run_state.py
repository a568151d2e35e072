"""Where a run is, read from its run dir alone (and SLURM's squeue/sacct for a submitted one): its state,
step of max, last loss, tokens/s, ETA, newest checkpoint. `sharpen status | logs | cancel | runs` read it.

A local run's launcher (`sharpen run | resume`, launcher/commands/run.py) keeps RUN/launch.json: its pid,
host and start, then how it ended. A launch.json that says nothing of an end, whose pid is gone, is a
launcher that died (kill -9, a reboot) before it could say.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.plan import PLAN_FILE

LAUNCH_FILE = "launch.json"
# What `sharpen status --json` says a run is doing (stable names).
RUNNING, FINISHED, FAILED, STOPPED, QUEUED, UNKNOWN = "running", "finished", "failed", "stopped", "queued", "unknown"
# Logged steps the rate (tokens/s, ETA) is taken over.
RECENT_STEPS = 5


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S%z"))
    except ValueError:
        return None


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (Linux): state first; None where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), so that a reused pid is not taken for the launcher."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def launcher_alive(launch: dict) -> bool | None:
    """Whether the launcher of launch.json is alive: None when it ran on another host (cannot tell here).
    A zombie (ended, its parent has not yet collected it) is not."""
    from training.heartbeat import pid_alive

    if launch.get("host") != socket.gethostname():
        return None
    pid = int(launch.get("pid", 0))
    if pid <= 0 or not pid_alive(pid):
        return False
    fields = proc_stat(pid)
    if fields is None:
        return True
    started = launch.get("pid_started")
    return fields[0] != "Z" and (started is None or fields[19] == started)


def read_launch(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / LAUNCH_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_launch(run_dir: Path, data: dict) -> None:
    path = Path(run_dir) / LAUNCH_FILE
    tmp = path.with_name(f".{LAUNCH_FILE}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def record_start(run_dir: Path, command: str) -> dict:
    """This process is the run's launcher from now on: pid, host, start; the earlier launches' wall time
    (a resumed run) is kept in `earlier_wall_s`."""
    previous = read_launch(run_dir) or {}
    earlier = float(previous.get("earlier_wall_s", 0.0))
    begun, ended = parse_iso(previous.get("started_at")), parse_iso(previous.get("ended_at"))
    if begun is not None and ended is not None:
        earlier += max(0.0, ended - begun)
    data = {
        "pid": os.getpid(), "pid_started": process_start(os.getpid()), "host": socket.gethostname(),
        "command": command, "started_at": now_iso(),
        "first_started_at": previous.get("first_started_at") or now_iso(), "earlier_wall_s": earlier,
    }  # fmt: skip
    write_launch(run_dir, data)
    return data


def record_end(run_dir: Path, launch: dict, exit_code: int, outcome: str, detail: str = "") -> None:
    """How the launcher ended: finished, failed or stopped, with the reason a user reads."""
    write_launch(run_dir, {**launch, "ended_at": now_iso(), "exit_code": exit_code, "outcome": outcome,
                           "detail": detail})  # fmt: skip


# The ends of ranks that were stopped from outside: a stop, said as a user reads it.
STOP_SIGNALS = {
    "SIGTERM": "SIGTERM to the launcher (sharpen cancel, kill)",
    "SIGINT": "Ctrl-C (SIGINT)",
    "SIGHUP": "SIGHUP (its terminal closed)",
}


def stopped_by(signal_name: str) -> str:
    return "by " + STOP_SIGNALS.get(signal_name, signal_name)


def outcome_of(exit_code: int, failure: dict | None) -> tuple[str, str]:
    """(outcome, detail) of a launcher that returned `exit_code`, with cluster/local.py's failure summary."""
    from cluster.requeue import EXIT_STOPPED_EARLY

    if exit_code == 0:
        return FINISHED, ""
    if exit_code == EXIT_STOPPED_EARLY:
        return STOPPED, "every rank stopped early on purpose (rank 0's log says why)"
    if not failure:
        return FAILED, f"the launcher exited with {exit_code}"
    if failure.get("reason") == "failed" and failure.get("ends") and set(failure["ends"]) <= set(STOP_SIGNALS):
        return STOPPED, ", ".join(stopped_by(name) for name in failure["ends"])
    if "rank" in failure:
        detail = f"rank {failure['rank']} failed ({failure.get('exit', '?')})"
        return FAILED, detail + (f": {failure['message']}" if failure.get("message") else "")
    return FAILED, failure.get("message", "")


@dataclass
class RunState:
    """One run as `sharpen status --json` prints it; the key names are stable."""

    run_dir: str
    name: str
    kind: str  # local | slurm
    method: str
    finetune: str
    strategy: str
    ranks: int
    state: str
    detail: str = ""
    step: int | None = None
    max_steps: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    started_at: str | None = None
    ended_at: str | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    final: str | None = None
    log: str = ""
    pid: int | None = None
    host: str | None = None
    slurm: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict:
        return asdict(self)


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training rows, read as report.md and `sharpen compare` read them (torch-free)."""
    from training.report import read_rows

    return read_rows(run_dir)[0]


def recent_rate(rows: list[dict]) -> tuple[float | None, float | None]:
    """(tokens/s, steps/s) over the last RECENT_STEPS logged steps of the same launch (elapsed_s restarts
    when a run is resumed)."""
    if not rows:
        return None, None
    segment = [rows[-1]]
    for row in reversed(rows[:-1]):
        if row.get("elapsed_s") is None or row["elapsed_s"] >= segment[0].get("elapsed_s", 0):
            break
        segment.insert(0, row)
        if len(segment) > RECENT_STEPS:
            break
    tokens_per_s = [r["tokens_per_s"] for r in segment[-RECENT_STEPS:] if r.get("tokens_per_s") is not None]
    tokens_rate = sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else None
    if len(segment) < 2:
        return tokens_rate, None
    seconds = segment[-1]["elapsed_s"] - segment[0]["elapsed_s"]
    steps = segment[-1]["step"] - segment[0]["step"]
    return tokens_rate, (steps / seconds if seconds > 0 and steps > 0 else None)


def slurm_seconds(text: str) -> float | None:
    """SLURM's elapsed time ([D-]HH:MM:SS, MM:SS) in seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", (text or "").strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_state(run_dir: Path, final: bool) -> tuple[str, str, dict]:
    """(state, detail, the job's facts) of a submitted run, from squeue/scontrol/sacct."""
    from cluster import slurm
    from cluster.requeue import read_requeue_count

    job_id = slurm.read_job_id(run_dir)
    job = slurm.job_state(job_id)
    state, detail = job_run_state(job, final)
    return state, detail, {"job_id": job_id, "requeues": read_requeue_count(run_dir), **(job or {})}


def job_run_state(job: dict[str, str] | None, final: bool) -> tuple[str, str]:
    """(state, detail) of a run from what SLURM says of its job (cluster.slurm.job_state) and final/."""
    from cluster import slurm
    from cluster.requeue import EXIT_STOPPED_EARLY

    if job is None:
        if final:
            return FINISHED, "SLURM no longer knows the job; final/ is written"
        return UNKNOWN, "SLURM no longer knows the job (no accounting) and final/ is not written"
    name = job["state"].split()[0]
    if name == "PENDING":
        return QUEUED, f"waiting: {job['reason']}" if job["reason"] not in ("", "None", "(null)") else ""
    if name in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return STOPPED, "stopped and requeued: it resumes from its checkpoint when SLURM starts it again"
    if slurm.is_active(job):
        return RUNNING, ""
    if name == "COMPLETED":
        return (FINISHED, "") if final else (STOPPED, "the job ended before max_steps (stopped early, not requeued)")
    if name in ("PREEMPTED", "CANCELLED"):
        return STOPPED, "preempted" if name == "PREEMPTED" else "cancelled"
    if job.get("exit_code", "").split(":")[0] == str(EXIT_STOPPED_EARLY):
        return STOPPED, "stopped early, not requeued"
    return FAILED, f"SLURM: {name}, exit code {job.get('exit_code') or '?'}"


def heartbeat_note(run_dir: Path) -> str:
    """'no rank has made progress for N s' when every heartbeat is older than its hang limit, else ''."""
    from training.heartbeat import HEARTBEAT_DIR

    beats = []
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json"):
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not beats:
        return ""
    quiet = time.time() - max(b.get("last_advance", 0) for b in beats)
    limit = min(b.get("limit_s", float("inf")) for b in beats)
    if quiet > limit:
        return f"no rank has made progress for {quiet:.0f} s (hang limit {limit:.0f} s): it may be hung"
    return ""


def local_state(run_dir: Path, launch: dict | None, final: bool) -> tuple[str, str]:
    if launch is None:
        return (FINISHED, "") if final else (UNKNOWN, f"no {LAUNCH_FILE}: not started by this sharpen, or never")
    if launch.get("outcome"):
        return launch["outcome"], launch.get("detail", "")
    alive = launcher_alive(launch)
    if alive:
        return RUNNING, heartbeat_note(run_dir)
    if alive is None:
        note = heartbeat_note(run_dir)
        return (UNKNOWN, f"started on {launch.get('host')}; {note}") if note else (
            RUNNING, f"on {launch.get('host')} (its process cannot be checked from here)")
    return FAILED, (
        f"interrupted: the launcher (pid {launch.get('pid')}) is gone without saying how the run ended "
        "(killed, or the machine restarted)"
    )


def run_dir_of(path: str | Path) -> Path:
    run_dir = Path(path)
    if not (run_dir / PLAN_FILE).is_file():
        raise UserError(f"{run_dir}: not a sharpen run directory (no {PLAN_FILE})")
    return run_dir


def is_slurm(run_dir: Path, launch: dict | None) -> bool:
    """Whether the run's latest launch was a SLURM job (a run submitted, then resumed here, is local)."""
    from cluster.slurm import JOB_ID_FILE

    job_file = Path(run_dir) / JOB_ID_FILE
    if not job_file.is_file():
        return False
    launch_file = Path(run_dir) / LAUNCH_FILE
    return launch is None or job_file.stat().st_mtime >= launch_file.stat().st_mtime


def default_log(run_dir: Path, slurm: bool) -> Path:
    """The log `sharpen logs` prints: the SLURM job's (every node's agent and rank 0), else rank 0's."""
    from cluster import slurm as slurm_cluster

    if slurm:
        return slurm_cluster.log_path(run_dir, slurm_cluster.read_job_id(run_dir))
    return Path(run_dir) / "logs" / "rank-0.log"


def read_state(path: str | Path, query_slurm: bool = True) -> RunState:
    """The run at `path`: what it is, where it is, how far it got. UserError when it is not a run dir."""
    from training.checkpoint_dirs import latest_checkpoint

    run_dir = run_dir_of(path)
    try:
        plan = json.loads((run_dir / PLAN_FILE).read_text())
        job = plan["job"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir}/{PLAN_FILE} cannot be read as a plan") from None
    launch = read_launch(run_dir)
    final = (run_dir / "final").is_dir()
    slurm = is_slurm(run_dir, launch)
    facts = None
    if slurm and query_slurm:
        state, detail, facts = slurm_state(run_dir, final)
    elif slurm:
        state, detail = (FINISHED, "") if final else (UNKNOWN, "a SLURM job; `sharpen status` asks SLURM")
    else:
        state, detail = local_state(run_dir, launch, final)
    rows = train_rows(run_dir)
    last = rows[-1] if rows else {}
    max_steps = int(job.get("train", {}).get("max_steps", 0))
    tokens_per_s, steps_per_s = recent_rate(rows)
    latest = latest_checkpoint(run_dir)
    log = default_log(run_dir, slurm)
    info = RunState(
        run_dir=str(run_dir), name=job.get("name", run_dir.name), kind="slurm" if slurm else "local",
        method=job.get("method", {}).get("kind", "?"), finetune=job.get("finetune", {}).get("type", "?"),
        strategy=plan.get("strategy", "?"), ranks=int(plan.get("world_size", 0)), state=state, detail=detail,
        step=last.get("step"), max_steps=max_steps, loss=last.get("loss"), log=str(log),
        checkpoint=str(latest[1]) if latest else None, checkpoint_step=latest[0] if latest else None,
        final=str(run_dir / "final") if final else None, slurm=facts,
    )  # fmt: skip
    if state == RUNNING:
        info.tokens_per_s = tokens_per_s
        if steps_per_s and info.step is not None:
            info.eta_s = (max_steps - info.step) / steps_per_s
    elif tokens_per_s is not None:
        info.tokens_per_s = tokens_per_s
    if launch is not None and not slurm:
        info.pid, info.host = launch.get("pid"), launch.get("host")
        info.started_at, info.ended_at = launch.get("first_started_at"), launch.get("ended_at")
        begun, ended = parse_iso(launch.get("started_at")), parse_iso(launch.get("ended_at"))
        if begun is not None:
            end = ended if ended is not None else (time.time() if state == RUNNING else None)
            if end is not None:
                info.elapsed_s = float(launch.get("earlier_wall_s", 0.0)) + max(0.0, end - begun)
    elif facts and slurm_seconds(facts.get("elapsed", "")):
        info.elapsed_s = slurm_seconds(facts["elapsed"])  # this attempt of the job
    if info.elapsed_s is None and last.get("elapsed_s") is not None:
        info.elapsed_s = float(last["elapsed_s"])  # the training loop's own clock: without start-up
    if info.started_at is None:
        info.started_at = plan.get("created")
    return info


def duration(seconds: float | None) -> str:
    """1:02:03, 4:05 or 12 s."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_lines(info: RunState) -> list[str]:
    """What `sharpen status` prints below the state line, for either kind of run."""
    if info.step is None:
        lines = [f"progress: no step logged yet (of {info.max_steps})"]
    else:
        lines = [f"progress: step {info.step} of {info.max_steps}, loss {info.loss:.4f}"]
    rate = []
    if info.tokens_per_s is not None:
        rate.append(f"{info.tokens_per_s:,.0f} tokens/s")
    if info.eta_s is not None:
        rate.append(f"ETA {duration(info.eta_s)}")
    if info.elapsed_s is not None:
        rate.append(f"elapsed {duration(info.elapsed_s)}")
    if rate:
        lines.append("speed: " + ", ".join(rate))
    lines.append(f"newest checkpoint: step {info.checkpoint_step} ({info.checkpoint})" if info.checkpoint
                 else "newest checkpoint: none yet")  # fmt: skip
    if info.final:
        lines.append(f"output: {info.final}")
    return lines


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """The run dirs (with a plan.json) under `root`, `depth` levels down at most; not inside a run dir."""
    found = []

    def walk(directory: Path, level: int) -> None:
        if (directory / PLAN_FILE).is_file():
            found.append(directory)
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, level + 1)

    walk(Path(root), 0)
    return found
