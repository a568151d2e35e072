"""A real two-node SLURM cluster on this machine for the tests: munged, slurmctld and two `slurmd -N`.

Debian's slurm-wlm packages run several slurmd on one host: each node is a name with its own port,
both at 127.0.0.1. Everything (config, state, spool, logs, the munge key and socket) lives in one
directory, so clusters of several test sessions on one machine do not meet. Clients find the cluster
through SLURM_CONF, which `start` sets in this process's environment (subprocesses inherit it, and
sbatch passes it on to the jobs).

    python tests/support/slurm_cluster.py start DIR     # leaves it running, prints `export SLURM_CONF=...`
    python tests/support/slurm_cluster.py stop DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo"]
NODES = ("node1", "node2")
# Finished jobs stay visible to squeue/scontrol this long (the test cluster keeps no accounting for sacct).
MIN_JOB_AGE_S = 600
SBIN = ("/usr/sbin", "/sbin")


class ClusterUnavailable(Exception):
    """SLURM cannot be installed or started here: the reason, shown when the tests skip."""


def _path_with_sbin() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [d for d in SBIN if d not in parts])


def missing_programs() -> list[str]:
    path = _path_with_sbin()
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def ensure_installed() -> None:
    """Install Debian's SLURM and munge packages when a program is missing (apt-get update once)."""
    missing = missing_programs()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed, and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from exc
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {tail}")
    if missing_programs():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(missing_programs())}")


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs=1 State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
ClusterName=sharpen{ctld_port}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge={MIN_JOB_AGE_S}
KillWait=10
InactiveLimit=0
EnforcePartLimits=ALL
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _run(cmd: list[str], env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _spawn(cmd: list[str], env: dict, log: Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def start(root: Path, timeout_s: float = 60) -> dict[str, str]:
    """Start the cluster in `root`; returns the environment variables clients need (SLURM_CONF, PATH)."""
    ensure_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd must run as root to start jobs as the submitting user")
    root = Path(root).resolve()
    if (root / "pids.json").exists():
        raise ClusterUnavailable(f"a cluster started in {root} is still running: `stop {root}` first")
    for sub in ("munge", "state", "log", "spool/node1", "spool/node2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    os.chmod(root / "munge", 0o700)
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, ctld_port, node_ports))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": _path_with_sbin()}
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge = root / "munge"
    pids = {
        "munged": _spawn(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/munge.socket",
             f"--pid-file={munge}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={munge}/seed"],
            env, root / "log" / "munged.out",
        ),
    }  # fmt: skip
    _wait_for(lambda: (munge / "munge.socket").exists(), 10, "munged did not create its socket", root)
    pids["slurmctld"] = _spawn(["slurmctld", "-D", "-c", "-f", str(conf)], env, root / "log" / "slurmctld.out")
    for name in NODES:
        pids[name] = _spawn(["slurmd", "-D", "-N", name, "-f", str(conf)], env, root / "log" / f"slurmd-{name}.out")
    (root / "pids.json").write_text(json.dumps(pids))

    def both_idle() -> bool:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n in NODES)

    _wait_for(both_idle, timeout_s, "the nodes did not become idle", root)
    return {"SLURM_CONF": str(conf), "PATH": env["PATH"]}


def _wait_for(condition, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    logs = sorted((root / "log").glob("*"))
    tail = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-8:]) for p in logs)
    stop(root)
    raise ClusterUnavailable(f"{what} within {timeout_s:.0f}s; logs in {root / 'log'}:\n{tail}")


def stop(root: Path) -> None:
    """Cancel every job of this cluster, then stop its daemons (only the processes `start` began)."""
    root = Path(root).resolve()
    pid_file = root / "pids.json"
    if not pid_file.is_file():
        return
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": _path_with_sbin()}
    try:
        _run(["scancel", "--full", "--state=RUNNING"], env, timeout=10)
        _run(["scancel", "--state=PENDING"], env, timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _run(["squeue", "-h", "-t", "R,CG"], env, timeout=10).stdout.strip():
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass
    pids = json.loads(pid_file.read_text())
    daemons = [pids[name] for name in [*NODES, "slurmctld", "munged"] if pids.get(name)]
    for pid in daemons:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in daemons):
        time.sleep(0.1)
    for pid in daemons:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    pid_file.unlink()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running: reaped here if it is our child (the fixture), else not a zombie (`start` from the CLI)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def slurm_cluster_fixture(tmp_path_factory):
    """Session fixture body: the running cluster's directory; skips with the reason when SLURM is unavailable."""
    import pytest

    root = Path(tempfile.mkdtemp(prefix="sharpen-slurm-"))
    try:
        client_env = start(root)
    except ClusterUnavailable as exc:
        pytest.skip(f"no test SLURM cluster: {exc}")
    saved = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)
    try:
        yield root
    finally:
        stop(root)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    directory = Path(sys.argv[2])
    if sys.argv[1] == "start":
        try:
            variables = start(directory)
        except ClusterUnavailable as exc:
            sys.exit(f"error: {exc}")
        print(f"export SLURM_CONF={variables['SLURM_CONF']} PATH={variables['PATH']}")
    else:
        stop(directory)
