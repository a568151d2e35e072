"""The one reader of torchrun's and SLURM's variables: where this process sits, and which SLURM job it is in."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job this process runs in (inside an allocation or a job step)."""

    job_id: str
    num_nodes: int | None  # SLURM_JOB_NUM_NODES (SLURM_NNODES on older versions)
    node_id: int | None  # this node's index in the allocation
    restart_count: int  # times the job was requeued
    cpus_per_task: int | None


def _int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def slurm_job_id() -> str | None:
    """This process's SLURM job id, None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job() -> SlurmJob | None:
    """The SLURM job this process runs in, None outside SLURM."""
    job_id = slurm_job_id()
    if job_id is None:
        return None
    return SlurmJob(
        job_id=job_id,
        num_nodes=_int("SLURM_JOB_NUM_NODES") or _int("SLURM_NNODES"),
        node_id=_int("SLURM_NODEID"),
        restart_count=_int("SLURM_RESTART_COUNT", 0),
        cpus_per_task=_int("SLURM_CPUS_PER_TASK"),
    )


def slurm_hostnames() -> list[str]:
    """The allocation's hosts in node order (SLURM_JOB_NODELIST expanded by scontrol); [] outside SLURM."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        return out or [nodelist]
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")


def slurm_head_node() -> str:
    """The first host of the allocation."""
    hosts = slurm_hostnames()
    return hosts[0] if hosts else "127.0.0.1"


def from_environment() -> ProcessEnv:
    """torchrun/elastic-agent variables win (they are set for workers the agent starts); then SLURM's
    one-task-per-rank variables; else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return ProcessEnv(
            rank=_int("RANK", 0),
            local_rank=_int("LOCAL_RANK", 0),
            world_size=_int("WORLD_SIZE", 1),
            local_world_size=_int("LOCAL_WORLD_SIZE", 1),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int("MASTER_PORT", 29500),
        )
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return ProcessEnv(
            rank=_int("SLURM_PROCID", 0),
            local_rank=_int("SLURM_LOCALID", 0),
            world_size=_int("SLURM_NTASKS", 1),
            local_world_size=_int("SLURM_NTASKS_PER_NODE", None) or _int("SLURM_TASKS_PER_NODE", 1) or 1,
            master_addr=os.environ.get("MASTER_ADDR") or slurm_head_node(),
            master_port=_int("MASTER_PORT", 29500),
        )
    return ProcessEnv(0, 0, 1, 1, "127.0.0.1", free_port())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
