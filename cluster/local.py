"""Start this node's ranks through torch.distributed's elastic agent (the engine under torchrun); a lone
local CPU rank is forked from the launcher instead, which has already imported what it needs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

from cluster.environment import free_port
from cluster.hang_watch import HangWatch
from cluster.requeue import EXIT_STOPPED_EARLY
from training.env_hooks import RDZV_CONNECT_TIMEOUT_S

log = logging.getLogger("sharpen")

WORKER_MODULE = "training.worker"


def rank_threads(nproc_per_node: int) -> int | None:
    """Threads each of this machine's ranks runs with: OMP_NUM_THREADS where set, else the cores split
    between the ranks. None where OMP_NUM_THREADS is set to something torch's count is not read from."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        return max(1, (os.cpu_count() or 1) // nproc_per_node)
    return int(value) if value.strip().isdigit() else None


def worker_environment(device: str, nproc_per_node: int) -> dict[str, str]:
    """Variables every rank inherits: threads split between the ranks on a CPU, DeepSpeed told the device."""
    env: dict[str, str] = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(rank_threads(nproc_per_node))
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
    agent_signals: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
) -> int:
    """Run the ranks of this node until they finish. Returns 0 on success, 1 when a rank failed or the run
    hung (cluster/hang_watch.py), EXIT_STOPPED_EARLY when every rank stopped early on purpose.

    c10d rendezvous rather than static: the node hosting the endpoint runs the store, the others join
    it, and the agent's exit barrier does not trip when nodes finish at different times. `agent_signals`
    are the signals on which the agent stops its ranks; on SLURM SIGTERM is left to the ranks (they
    checkpoint first, cluster/node.py).
    """
    run_dir = Path(run_dir).resolve()
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    if nnodes == 1 and nproc_per_node == 1 and rdzv_endpoint is None and device == "cpu":
        return run_one_rank(run_dir, device)

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint = rdzv_endpoint or f"127.0.0.1:{free_port()}"
    if node_rank > 0:
        default = float(os.environ.get(RDZV_CONNECT_TIMEOUT_S, "30"))
        wait_for_endpoint(endpoint, connect_timeout_s or default)
    agent_logs = run_dir / "logs" / "agent"
    agent_logs.mkdir(parents=True, exist_ok=True)
    os.environ.update(worker_environment(device, nproc_per_node))
    run_id = run_id or uuid.uuid4().hex[:12]
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"join_timeout": join_timeout_s, "is_host": node_rank == 0},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(agent_logs)),
        signals_to_handle=agent_signals,
    )
    # The agent's own INFO lines are noise for users; its warnings and errors still show.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    arrival = mark_arrival(run_dir, run_id, node_rank) if nnodes > 1 else None
    try:
        with HangWatch(run_dir, expected=nproc_per_node) as watch:
            try:
                elastic_launch(config, entrypoint=sys.executable)("-m", WORKER_MODULE, str(run_dir))
            except ChildFailedError as exc:
                if watch.report is not None:
                    return report_hang(run_dir, watch.report)
                return report_failure(run_dir, exc)
            except RendezvousTimeoutError:
                report = rendezvous_report(run_dir, run_id, nnodes, endpoint, join_timeout_s)
                print(report, file=sys.stderr)
                write_failure(run_dir, {"reason": "rendezvous", "message": report.splitlines()[0]})
                return 1
    finally:
        if arrival is not None:
            arrival.unlink(missing_ok=True)
    return 0


ARRIVALS_DIR = "logs/agent/arrived"


def mark_arrival(run_dir: Path, run_id: str, node_rank: int) -> Path:
    """This node has come to the rendezvous: a file in the shared run dir, which node 0 reads when the
    rendezvous does not complete, to name the nodes that never came. Removed when this node's agent ends."""
    path = run_dir / ARRIVALS_DIR / f"{run_id}.node-{node_rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"node": node_rank, "host": socket.gethostname(), "pid": os.getpid()}))
    return path


def rendezvous_report(run_dir: Path, run_id: str, nnodes: int, endpoint: str, timeout_s: int) -> str:
    """The nodes that did not come to the rendezvous, with their SLURM host names where there are some."""
    from cluster.environment import slurm_hostnames

    arrived = {}
    for path in (run_dir / ARRIVALS_DIR).glob(f"{run_id}.node-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        arrived[int(data["node"])] = data.get("host", "?")
    hosts = slurm_hostnames()
    missing = [n for n in range(nnodes) if n not in arrived]

    def named(node: int, host: str | None) -> str:
        return f"node {node} ({host})" if host else f"node {node}"

    lines = [
        f"error: the rendezvous at {endpoint} did not complete within {timeout_s} s (cluster.rendezvous_timeout_s): "
        f"{len(missing)} of {nnodes} node(s) never arrived: "
        + ", ".join(named(n, hosts[n] if n < len(hosts) else None) for n in missing),
        "  arrived: " + (", ".join(named(n, arrived[n]) for n in sorted(arrived)) or "none"),
        "  start `sharpen run` on every node with the same --nnodes and --master (on SLURM: look for the missing "
        "node's error in the job's log), and check that they reach the address (`sharpen doctor JOB` tests it)",
    ]
    return "\n".join(lines)


def rank_environment(run_id: str, error_file: Path) -> dict[str, str]:
    """What the elastic agent tells a worker it starts (a one-rank world here): torchrun's names."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_NAME": "default"}
    env.update({name: "1" for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")})
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        TORCHELASTIC_RUN_ID=run_id,
        TORCHELASTIC_RESTART_COUNT="0",
        TORCHELASTIC_MAX_RESTARTS="0",
        TORCHELASTIC_USE_AGENT_STORE="False",
        TORCHELASTIC_ERROR_FILE=str(error_file),
    )
    return env


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def run_one_rank(run_dir: Path, device: str) -> int:
    """One local CPU rank: forked from this process instead of spawned by the elastic agent.

    Planning has already imported torch and transformers here; a spawned worker imports them again
    (2.5 s of the bench job's 7 s to its first step, docs/BENCHMARKS.md). The rank is still a process of its own,
    so a crash or a kill -9 of it is reported as the agent reports one, and the signals the agent passes on
    to its workers are passed on to it. CPU only: on a GPU the plan's device check has initialised CUDA in
    this process, which a forked child cannot use."""
    import multiprocessing

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = run_dir / "logs" / "agent" / "rank-0-error.json"
    error_file.parent.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    env = {**worker_environment(device, 1), **rank_environment(uuid.uuid4().hex[:12], error_file)}
    rank = multiprocessing.get_context("fork").Process(target=_rank_main, args=(run_dir, env), name="sharpen-rank-0")

    def forward(signum, _frame) -> None:
        os.kill(rank.pid, signum)

    # Blocked across the fork: a signal arriving before the handlers are in place waits for them, in
    # both processes, instead of killing this one and leaving the rank behind.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        rank.start()
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    try:
        with HangWatch(run_dir) as watch:
            rank.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rank.exitcode == 0:
        return 0
    if watch.report is not None:
        return report_hang(run_dir, watch.report)
    failure = ProcessFailure(local_rank=0, pid=rank.pid, exitcode=rank.exitcode, error_file=str(error_file))
    return report_failure(run_dir, ChildFailedError(WORKER_MODULE, {0: failure}))


def _rank_main(run_dir: Path, env: dict[str, str]) -> None:
    """The forked rank: the signal handlers, variables and thread count a spawned worker starts with."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    for s in FORWARDED_SIGNALS:
        signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    os.environ.update(env)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # this process's torch read it before it was set
    from training.worker import main

    sys.exit(record(main)(str(run_dir)))


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


FAILURE_FILE = "logs/agent/failure.json"


def write_failure(run_dir: Path, summary: dict) -> None:
    """How this node's ranks failed, in a line or two, for `sharpen status` (launcher/run_state.py)."""
    path = Path(run_dir) / FAILURE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary) + "\n")
    except OSError:
        pass  # a full or vanished run dir: the message on the terminal is what counts


def read_failure(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None


def report_hang(run_dir: Path, report: str) -> int:
    print(report, file=sys.stderr)
    write_failure(run_dir, {"reason": "hung", "message": report.strip().splitlines()[0].removeprefix("error: ")})
    return 1


def report_failure(run_dir: Path, exc) -> int:
    """Name the first failed rank, its exit code, the last lines of its log, and where the whole log is.
    Returns the launcher's exit code: 1, or EXIT_STOPPED_EARLY where the ranks that did not end with 0 all
    stopped early on purpose (a SIGTERM, or a stop request that could not requeue): rank 0 has said why."""
    failures = getattr(exc, "failures", {}) or {}
    if not failures:
        print(f"error: the run failed ({exc})", file=sys.stderr)
        write_failure(run_dir, {"reason": "failed", "message": f"the run failed ({exc})"})
        return 1
    if all(f.exitcode == EXIT_STOPPED_EARLY for f in failures.values()):
        return EXIT_STOPPED_EARLY
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
    write_failure(run_dir, {
        "reason": "failed", "rank": first_rank, "exit": reason, "log": str(log_path),
        "ends": sorted({f.signal_name() if f.exitcode < 0 else f"exit {f.exitcode}" for f in failures.values()}),
        "message": message.strip().splitlines()[-1] if message.strip() else "",
    })  # fmt: skip
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
    return 1
