"""The frozen Plan: everything a rank needs, resolved once in the user's process, read from RUN/plan.json.

A contract module: it imports nothing of sharpen but the other contract modules (spec, errors), so a rank
reads its plan without importing the planner (launcher/planner.py).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from launcher.errors import UserError
from launcher.spec import JobSpec

PLAN_FILE = "plan.json"
# The hang watch (training/heartbeat.py, cluster/hang_watch.py): without train.hang_timeout_s, a rank is hung
# after max(AUTO_HANG_FLOOR_S, 10 x its slowest step, its start-up) without progress; start-up, checkpoints
# and final/ get at least STARTUP_HANG_LIMIT_S.
AUTO_HANG_FLOOR_S = 300
STARTUP_HANG_LIMIT_S = 1800
# Collectives that wait longer than this fail instead of hanging. Longer than any hang limit, so that the
# watch, which names where every rank is, speaks first; the collective's own timeout is the backstop.
COLLECTIVE_TIMEOUT_S = STARTUP_HANG_LIMIT_S + 300


# Half of SLURM's default KillWait (30 s): the grace after SIGTERM where the site's cannot be read.
DEFAULT_STOP_GRACE_S = 15.0


def collective_timeout_s(hang_timeout_s: int | None) -> int:
    return max(COLLECTIVE_TIMEOUT_S, (hang_timeout_s or 0) + 300)
# A checkpoint's bytes per trainable parameter, before one exists to measure: its fp32 weights and AdamW's
# two fp32 moments (frozen weights are not saved; DCP stores a replicated tensor once, a sharded one in
# shards that add up to it). DeepSpeed's files add its 16-bit module weights, about 15% more.
CHECKPOINT_BYTES_PER_TRAINABLE = 12


class Plan(BaseModel):
    """Everything a rank needs, resolved once in the user's process."""

    model_config = ConfigDict(extra="forbid")

    sharpen_version: str
    created: str
    job: dict[str, Any]  # the validated JobSpec, dumped
    job_hash: str
    run_dir: str
    device: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]
    nnodes: int
    nproc_per_node: int
    world_size: int
    # strategy.sequence_parallel: each row split over groups of this many consecutive ranks (rank // degree
    # is a rank's data-parallel group, rank % degree its chunk of the row)
    sequence_parallel: int = 1
    strategy: str
    strategy_reason: str
    compute_dtype: Literal["bf16", "fp16", "fp32"]
    storage_dtype: Literal["bf16", "fp16", "fp32"]
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    params: dict[str, int]
    state_bytes_per_rank: dict[str, int]
    collective_timeout_s: int = COLLECTIVE_TIMEOUT_S
    # On SLURM, after SIGTERM: checkpoint if the step boundary comes within this many seconds
    # (cluster.slurm.grace_s, else half the site's GraceTime + KillWait, read by `sharpen submit`).
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    data_cache: str | None = None
    reference: dict[str, Any] | None = None  # DPO's or GRPO's reference model: where it comes from, what it costs
    # GRPO's rollout per rank: generation_batch (rows), row_length, kv_cache_bytes, decode_logits_bytes,
    # reference_bytes, reward_model_bytes, generation_peak_bytes (launcher/candidates.py's rollout)
    rollout: dict[str, Any] | None = None
    # The fp32 CPU matmul engine of every rank (model.cpu_matmul resolved, training/kernels/__init__.py).
    # None: auto, left to the ranks (rank 0 measures; it writes its choice here when the run starts).
    cpu_matmul: Literal["aten", "onednn"] | None = None
    # The memory plan (launcher/planner.py): each candidate's bytes per rank at its micro batch, the chosen
    # one, and the GPU bytes fits were checked against (None: unknown, not checked).
    offload: str = "none"
    gpu_memory_bytes: int | None = None
    usable_bytes: int | None = None
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    chosen: dict[str, Any] | None = None

    @property
    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.job)

    @property
    def checkpoint_bytes(self) -> int:
        """The size on disk of one checkpoint, estimated from the trainable parameters (all ranks together)."""
        return CHECKPOINT_BYTES_PER_TRAINABLE * self.params["trainable"]

    def write(self, run_dir: Path) -> Path:
        """Atomically, from a temporary file of this process's own: every node of a multi-machine run
        writes the same plan into the shared run dir, and one fixed temporary name let a node rename
        away the file another was about to rename (FileNotFoundError)."""
        path = Path(run_dir) / PLAN_FILE
        tmp = path.with_name(f"{PLAN_FILE}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> Plan:
        path = Path(run_dir) / PLAN_FILE
        if not path.is_file():
            raise UserError(f"{run_dir}: not a sharpen run directory (no {PLAN_FILE})")
        return cls.model_validate_json(path.read_text())
