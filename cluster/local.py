"""Start this node's ranks through torch.distributed's elastic agent (the engine under torchrun)."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

from cluster.environment import free_port

log = logging.getLogger("sharpen")

WORKER_MODULE = "training.worker"


def worker_environment(device: str, nproc_per_node: int) -> dict[str, str]:
    """Variables every rank inherits: threads split between the ranks on a CPU, DeepSpeed told the device."""
    env: dict[str, str] = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return env


def launch(
    run_dir: Path,
    *,
    nproc_per_node: int,
    device: str,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    run_id: str | None = None,
    join_timeout_s: int = 900,
    connect_timeout_s: float | None = None,
) -> int:
    """Run the ranks of this node until they finish. Returns 0 on success, 1 when a rank failed.

    c10d rendezvous rather than static: the node hosting the endpoint runs the store, the others join
    it, and the agent's exit barrier does not trip when nodes finish at different times.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = Path(run_dir).resolve()
    endpoint = rdzv_endpoint or f"127.0.0.1:{free_port()}"
    if node_rank > 0:
        default = float(os.environ.get("SHARPEN_RDZV_CONNECT_TIMEOUT_S", "30"))
        wait_for_endpoint(endpoint, connect_timeout_s or default)
    agent_logs = run_dir / "logs" / "agent"
    agent_logs.mkdir(parents=True, exist_ok=True)
    os.environ.update(worker_environment(device, nproc_per_node))
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run_id or uuid.uuid4().hex[:12],
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"join_timeout": join_timeout_s, "is_host": node_rank == 0},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(agent_logs)),
    )
    # The agent's own INFO lines are noise for users; its warnings and errors still show.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", WORKER_MODULE, str(run_dir))
    except ChildFailedError as exc:
        report_failure(run_dir, exc)
        return 1
    return 0


def wait_for_endpoint(endpoint: str, timeout_s: float) -> None:
    """Fail in seconds, naming the address, when node 0's rendezvous store cannot be reached: otherwise
    the agent retries for minutes and ends in a traceback. Node 0 may start a little later, hence the wait."""
    import socket
    import time

    from launcher.errors import UserError

    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(1.0)
    raise UserError(
        f"cannot reach the rendezvous at {endpoint} (node 0) after {timeout_s:.0f} s: {last_error}",
        "start node 0 first with the same --master, check the address is node 0's and that the port is "
        "open between the machines (`sharpen doctor JOB` tests it)",
    )


def _blame_order(failure) -> tuple[int, float]:
    """Which failure to show first. A rank killed by a signal (other than the agent's own SIGTERM) is
    usually the cause, and the others fail on their broken connections; it has no error file, so torch
    stamps it with the time the agent noticed, which can be later than theirs."""
    killed = failure.exitcode < 0 and failure.signal_name() != "SIGTERM"
    return (0 if killed else 1, failure.timestamp or 0)


def report_failure(run_dir: Path, exc) -> None:
    """Name the first failed rank, its exit code, the last lines of its log, and where the whole log is."""
    failures = getattr(exc, "failures", {}) or {}
    if not failures:
        print(f"error: the run failed ({exc})", file=sys.stderr)
        return
    first_rank = min(failures, key=lambda r: _blame_order(failures[r]))
    failure = failures[first_rank]
    reason = f"exit code {failure.exitcode}"
    if failure.signal_name() not in ("", "<N/A>", None):
        reason = f"killed by {failure.signal_name()}"
    message = ""
    if failure.error_file and Path(failure.error_file).is_file():
        try:
            data = json.loads(Path(failure.error_file).read_text())
            message = data.get("message", {}).get("message", "") if isinstance(data.get("message"), dict) else ""
        except (OSError, ValueError):
            message = ""
    log_path = run_dir / "logs" / f"rank-{first_rank}.log"
    print(f"error: rank {first_rank} failed ({reason}); the other ranks were stopped", file=sys.stderr)
    others = sorted(r for r in failures if r != first_rank)
    if others:
        print(f"  also failed after it: rank(s) {', '.join(map(str, others))}", file=sys.stderr)
    if message:
        print(f"  {message.strip().splitlines()[-1]}", file=sys.stderr)
    if log_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        print("  last lines of its log:", file=sys.stderr)
        for line in tail:
            print(f"    {line}", file=sys.stderr)
    print(f"  full log: {log_path}", file=sys.stderr)
