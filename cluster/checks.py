"""The checks of `sharpen doctor`: versions, devices, SLURM, rendezvous and an all-reduce test, a verdict each.

Imports and the all-reduce run in child processes (cluster/doctor_ranks.py), each with a time limit, so
a broken package or a hung collective becomes a FAIL line, never a traceback or a hang of the doctor.
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
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from training.env_hooks import DOCTOR_TIMEOUT_S

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
GIB = 1024**3
PROBE_TIMEOUT_S = 120  # a first import from a cold network file system can take a minute
CONNECT_TIMEOUT_S = 3.0
# The all-reduce test: (bytes, timed iterations) per device. Gloo on a CPU moves ~1 GB/s, so less there.
TEST_SIZE = {"cuda": (64 * 2**20, 10), "cpu": (16 * 2**20, 5)}
TIMEOUT_VARIABLE, DEFAULT_TEST_TIMEOUT_S = DOCTOR_TIMEOUT_S, 120.0  # seconds the all-reduce test may take
# (module, what sharpen uses it for, when a job needs it). Without a job every dependency is needed; a job
# also needs the packages its strategy declares (strategies/ knows them; `sharpen doctor` hands them in).
PACKAGES = [
    ("deepspeed", "ZeRO strategies", lambda spec: False),  # only through strategy_packages
    ("transformers", "models and tokenizers", lambda spec: True),
    ("peft", "LoRA adapters", lambda spec: spec.finetune.type in ("lora", "qlora")),
    ("bitsandbytes", "QLoRA's 4-bit weights", lambda spec: spec.finetune.type == "qlora"),
    ("datasets", "data loading", lambda spec: True),
]


@dataclass
class Check:
    check: str
    verdict: str
    detail: str


def run_checks(
    spec, master: tuple[str, int] | None, test_timeout_s: float, strategy_packages: Collection[str] = ()
) -> Iterator[Check]:
    """Every check in order; the slow ones (imports, all-reduce) in child processes with time limits.
    `strategy_packages`: the modules the job's strategy needs (strategies.capabilities(name).packages)."""
    yield Check("python", OK, f"{sys.version.split()[0]} ({sys.executable})")
    probes = probe(["torch", *(name for name, _, _ in PACKAGES), "flash_attn"])
    torch_info = probes["torch"]
    yield from torch_checks(torch_info)
    for name, use, needed in PACKAGES:
        yield package_check(name, use, probes[name], spec is None or name in strategy_packages or needed(spec))
    yield flash_attn_check(probes["flash_attn"], spec)
    gpus = torch_info.get("gpus") or []
    device = job_device(spec, gpus)
    yield from device_checks(spec, gpus, device)
    yield from slurm_checks(spec)
    yield rendezvous_check(master)
    if "version" not in torch_info:
        yield Check("all-reduce", SKIP, "not run: torch does not import")
        return
    nproc = spec.resources.gpus_per_node if spec else (len(gpus) if device == "cuda" else 2)
    yield allreduce_check(device, nproc, len(gpus), test_timeout_s)


def probe(modules: list[str]) -> dict[str, dict]:
    """{module: what `python -m cluster.doctor_ranks probe` found}. The modules are imported in one process,
    in order; when an import crashes or hangs it, that module gets the error and the rest go to a new one."""
    found: dict[str, dict] = {}
    while len(found) < len(modules):
        pending = [m for m in modules if m not in found]
        command = [sys.executable, "-m", "cluster.doctor_ranks", "probe", *pending]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
            stdout = result.stdout
            problem = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            problem = f"no answer within {PROBE_TIMEOUT_S} s"
        for line in stdout.splitlines():
            if line.startswith('{"module"'):
                info = json.loads(line)
                found[info.pop("module")] = info
        culprit = next((m for m in pending if m not in found), None)
        if culprit:
            found[culprit] = {"error": f"importing it ended the process: {problem}"}
    return found


def torch_checks(info: dict) -> Iterator[Check]:
    if "version" not in info:
        what = "not installed" if info.get("missing") else f"import fails: {info['error']}"
        yield Check("torch", FAIL, f"{what}; fix: scripts/setup.sh, or pip install torch")
        return
    build = f"CUDA {info['cuda']} build" if info["cuda"] else "CPU build (no CUDA)"
    yield Check("torch", OK, f"{info['version']}, {build}")
    if info["cuda"]:
        yield Check("nccl", OK if info["nccl"] else WARN, info["nccl"] or "torch was built without NCCL")


def package_check(name: str, use: str, info: dict, needed: bool) -> Check:
    if "version" in info:
        return Check(name, OK, f"{info['version']}")
    problem = "not installed" if info.get("missing") else f"installed but import fails: {info['error']}"
    return Check(name, FAIL if needed else WARN, f"{problem} (used for {use}); fix: pip install {name}")


def flash_attn_check(info: dict, spec) -> Check:
    asked = spec is not None and spec.model.attention == "flash_attention_2"
    if "version" in info:
        return Check("flash_attn", OK, info["version"])
    problem = "not installed" if info.get("missing") else f"import fails: {info['error']}"
    if asked:
        return Check(
            "flash_attn",
            WARN,
            f"{problem}, but the job asks for it; fix: pip install flash-attn, or model.attention: sdpa",
        )
    return Check("flash_attn", OK, f"{problem} (only needed for model.attention: flash_attention_2)")


def job_device(spec, gpus: list) -> str:
    return ("cuda" if gpus else "cpu") if spec is None or spec.device == "auto" else spec.device


def device_checks(spec, gpus: list, device: str) -> Iterator[Check]:
    for i, gpu in enumerate(gpus):
        busy, total, free = (gpu["total"] - gpu["free"]) / GIB, gpu["total"] / GIB, gpu["free"] / GIB
        note = f"; {busy:.1f} GiB held by other processes (nvidia-smi)" if busy > 0.2 * total else ""
        yield Check(
            f"gpu {i}", WARN if note else OK, f"{gpu['name']}, {total:.1f} GiB, {free:.1f} GiB free{note}"
        )
    if not gpus:
        yield Check("devices", OK, "no GPU: CPU with gloo")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if spec is None:
        yield Check("cpu", OK, f"{cores} cores")
        return
    nproc = spec.resources.gpus_per_node
    # A SLURM job runs on the compute nodes: from a login node, a shortfall here is only a warning.
    elsewhere = spec.cluster.kind == "slurm" and "SLURM_JOB_ID" not in os.environ
    short, where = (
        (WARN, " on this machine (check a compute node: `srun ... sharpen doctor JOB`)")
        if elsewhere
        else (FAIL, "")
    )
    if device == "cuda" and nproc > len(gpus):
        fix = (
            f"resources.gpus_per_node: {len(gpus)} or check CUDA_VISIBLE_DEVICES"
            if gpus
            else "device: cpu or auto"
        )
        yield Check(
            "ranks", short, f"{nproc} rank(s) per node but {len(gpus)} visible GPU(s){where}; fix: {fix}"
        )
    elif device == "cuda":
        yield Check("ranks", OK, f"{nproc} rank(s) per node on {len(gpus)} visible GPU(s)")
    slow = "; ranks will share cores and run slowly" if nproc > cores else ""
    yield Check("cpu", WARN if slow else OK, f"{nproc} rank(s) per node on {cores} core(s){slow}")


def slurm_checks(spec) -> Iterator[Check]:
    if spec is None or spec.cluster.kind != "slurm":
        yield Check("slurm", SKIP, "not a SLURM job (cluster.kind local)" if spec else "no job file given")
        return
    missing = [p for p in ("sbatch", "squeue", "sinfo") if shutil.which(p) is None]
    if missing:
        yield Check(
            "slurm",
            FAIL,
            f"no {', '.join(missing)} on PATH: not a SLURM login node, or `module load slurm` first",
        )
        return
    yield Check("slurm", OK, f"sbatch, squeue and sinfo in {Path(shutil.which('sbatch')).parent}")
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P %a %D"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        yield Check("partition", FAIL, "sinfo did not answer in 30 s: is slurmctld reachable?")
        return
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        yield Check("partition", FAIL, f"sinfo failed ({said}): is slurmctld reachable, SLURM_CONF right?")
        return
    rows = [line.split() + ["?", "?"] for line in result.stdout.splitlines() if line.strip()]
    partitions = {row[0].rstrip("*"): row for row in rows}
    name = spec.cluster.slurm.partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    if name not in partitions:
        what = (
            f"partition {name!r} does not exist"
            if name
            else "no partition given and the cluster has no default"
        )
        yield Check(
            "partition",
            FAIL,
            f"{what}; sinfo lists: {', '.join(partitions) or 'none'}; fix: cluster.slurm.partition",
        )
        return
    _, available, nodes = partitions[name][:3]
    note = "" if spec.cluster.slurm.partition else " (the cluster's default)"
    yield Check("partition", OK if available == "up" else WARN, f"{name}{note}: {available}, {nodes} node(s)")


def rendezvous_check(master: tuple[str, int] | None) -> Check:
    """--master: resolvable and reachable in seconds (or, on node 0 itself, the port free to host it);
    without it, a free port on 127.0.0.1 for a one-machine run."""
    if master is None:
        from cluster.environment import free_port

        try:
            return Check("rendezvous", OK, f"local: 127.0.0.1:{free_port()} is free (no --master given)")
        except OSError as exc:
            return Check("rendezvous", FAIL, f"cannot bind a port on 127.0.0.1: {exc}")
    host, port = master
    address = f"{host}:{port}"
    hint = "start node 0 first, give its address as seen from here, and open the port between the machines"
    with ThreadPoolExecutor(1) as pool:  # getaddrinfo has no timeout of its own
        future = pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            family, _, _, _, ip_port = future.result(timeout=CONNECT_TIMEOUT_S)[0]
        except OSError as exc:
            return Check("rendezvous", FAIL, f"cannot resolve {host!r} ({exc}); give node 0's IP address")
        except TimeoutError:
            return Check("rendezvous", FAIL, f"resolving {host!r} took over {CONNECT_TIMEOUT_S:.0f} s")
    try:
        with socket.create_connection(ip_port[:2], timeout=CONNECT_TIMEOUT_S):
            return Check(
                "rendezvous", OK, f"{address} is reachable (something listens there: node 0's store)"
            )
    except OSError as exc:
        error = exc
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip_port[0], port))
        except OSError as exc:
            if (
                exc.errno == 98
            ):  # EADDRINUSE: this machine, and the port taken by something not listening to us
                return Check(
                    "rendezvous", FAIL, f"{address} is this machine but port {port} is in use; pick another"
                )
        else:
            return Check(
                "rendezvous", OK, f"{address} is this machine and port {port} is free: node 0 can host it"
            )
    reason = (
        f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
        if isinstance(error, TimeoutError)
        else error.strerror or str(error)
    )
    return Check("rendezvous", FAIL, f"cannot reach {address} ({reason}); {hint}")


def allreduce_check(
    device: str, nproc: int, visible_gpus: int, timeout_s: float = DEFAULT_TEST_TIMEOUT_S
) -> Check:
    """Time all-reduces across `nproc` ranks on this node; algorithm bandwidth = size / time per all-reduce,
    bus bandwidth = algbw × 2(n-1)/n (what each link carries in a ring: comparable across rank counts)."""
    backend = "nccl" if device == "cuda" else "gloo"
    if nproc < 2:
        return Check("all-reduce", SKIP, "one rank per node: nothing to all-reduce across on this machine")
    if device == "cuda" and nproc > visible_gpus:
        return Check("all-reduce", SKIP, f"not run: {nproc} ranks need {nproc} GPUs, {visible_gpus} visible")
    size, iters = TEST_SIZE[device]
    config = {
        "device": device,
        "nproc": nproc,
        "backend": backend,
        "bytes": size,
        "iters": iters,
        "timeout_s": timeout_s,
    }
    with tempfile.TemporaryDirectory(prefix="sharpen-doctor-") as tmp:
        test_dir = Path(tmp)
        (test_dir / "config.json").write_text(json.dumps(config))
        error = run_test_agent(test_dir, timeout_s)
        result_file = test_dir / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
    what = f"{nproc} ranks, {backend}, {iters} × {size / 2**20:.0f} MiB"
    if result is None:
        return Check("all-reduce", FAIL, f"{what}: {error or 'no result written'}")
    if result["wrong"]:
        return Check(
            "all-reduce", FAIL, f"{what}: {result['wrong']} of {result['elements']} values summed wrong"
        )
    per_op = result["seconds"] / iters
    algbw = size / per_op / 1e9
    busbw = algbw * 2 * (nproc - 1) / nproc
    detail = (
        f"{what}: {per_op * 1e3:.1f} ms each, algbw {algbw:.2f} GB/s, busbw {busbw:.2f} GB/s, values correct"
    )
    if backend == "nccl" and busbw < 1.0:
        return Check(
            "all-reduce",
            WARN,
            f"{detail}; slow for GPUs: see `nvidia-smi topo -m`, NCCL_P2P_DISABLE, NCCL_DEBUG=INFO",
        )
    return Check("all-reduce", OK, detail)


def run_test_agent(test_dir: Path, timeout_s: float) -> str | None:
    """Run the agent (which starts the ranks) until it ends or `timeout_s` passes; None, or what went wrong.
    Its output goes to a file, not a pipe: a stuck rank would hold a pipe open after the agent is gone."""
    command = [sys.executable, "-m", "cluster.doctor_ranks", "launch", str(test_dir)]
    log = test_dir / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            agent.wait(timeout=timeout_s)
        except KeyboardInterrupt:  # the agent is in its own session: Ctrl-C reaches only us
            stop(agent, test_dir)
            raise
        except subprocess.TimeoutExpired:
            stop(agent, test_dir)
            limit = f"{TIMEOUT_VARIABLE} sets the limit"
            return f"no result within {timeout_s:g} s (a hung rank or collective?): stopped; {limit}"
    if agent.returncode == 0:
        return None
    for error_file in sorted(test_dir.glob("rank-*.error")):  # the rank's own exception says most
        rank = error_file.stem.split("-")[1]
        return f"rank {rank} failed: {error_file.read_text().strip().splitlines()[-1]}"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"the ranks failed (exit code {agent.returncode}): {lines[-1] if lines else 'no output'}"


def stop(agent: subprocess.Popen, test_dir: Path) -> None:
    """SIGTERM lets the agent stop its ranks; whatever is left after 10 s (the agent, ranks in their own
    sessions) is killed by the pids it and they are known by."""
    agent.terminate()
    try:
        agent.wait(timeout=10)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
    for pid_file in test_dir.glob("rank-*.pid"):
        pid = pid_file.read_text().strip()
        try:  # the pid still ours: a rank of this test, not a process that reused the number
            if str(test_dir) in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
