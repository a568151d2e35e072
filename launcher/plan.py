"""JobSpec + the facts of this machine → the frozen Plan that every rank reads from RUN/plan.json."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from launcher import __version__
from launcher.errors import UserError
from launcher.memory import ParamCounts, count_parameters, state_bytes_per_rank
from launcher.spec import JobSpec

PLAN_FILE = "plan.json"
# Collectives that wait longer than this fail instead of hanging (torch's default is 30 minutes).
COLLECTIVE_TIMEOUT_S = 600


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
    data_cache: str | None = None

    @property
    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.job)

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / PLAN_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> Plan:
        path = Path(run_dir) / PLAN_FILE
        if not path.is_file():
            raise UserError(f"{run_dir}: not a sharpen run directory (no {PLAN_FILE})")
        return cls.model_validate_json(path.read_text())


def job_hash(spec: JobSpec) -> str:
    """A hash of what decides the trained weights' meaning (model, fine-tune type, method), for resume checks."""
    key = {"model": spec.model.path, "finetune": spec.finetune.model_dump(), "method": spec.method.model_dump()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def detect_device(requested: str) -> tuple[str, str | None]:
    """('cuda'|'cpu', notice or None). `cuda` without a GPU is a user error, never a silent CPU run."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UserError(
            "device: cuda was requested but no CUDA GPU is visible "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            "run on a GPU machine, or set device: cpu (or auto) to train on the CPU with gloo",
        )
    if requested == "auto":
        if has_cuda:
            return "cuda", None
        return "cpu", "no CUDA GPU found: training on the CPU with gloo (device: auto)"
    return requested, None


def resolve_dtypes(spec: JobSpec, device: str) -> tuple[str, str]:
    """(compute dtype, storage dtype of frozen weights)."""
    if spec.model.dtype == "auto":
        compute = "bf16" if device == "cuda" else "fp32"
    else:
        compute = spec.model.dtype
    storage = compute
    return compute, storage


def choose_strategy(spec: JobSpec, counts: ParamCounts, compute: str, storage: str, world: int) -> tuple[str, str]:
    """(strategy, why). The full cost-based choice lives in the planner; this is the least-communication rule."""
    if spec.strategy.name != "auto":
        return spec.strategy.name, "set in the job file"
    if world == 1:
        return "single", "one rank"
    gpu_bytes = spec.resources.gpu_memory_gb * 1024**3 if spec.resources.gpu_memory_gb else None
    for name in ("ddp", "zero1", "zero2", "fsdp", "zero3"):
        need = state_bytes_per_rank(counts, name, world, compute, storage)["total"]
        if gpu_bytes is None or need < 0.8 * gpu_bytes:
            why = "least communication" if gpu_bytes is None else "least communication that fits in 80% of GPU memory"
            return name, why
    return "zero3", "nothing fits; ZeRO-3 holds the least per rank"


def resolve_micro_batch(spec: JobSpec, world: int) -> tuple[int, int]:
    """(micro batch size, gradient accumulation steps) keeping the global batch."""
    gbs = spec.train.global_batch_size
    if spec.train.micro_batch_size == "auto":
        per_rank = gbs // world if gbs % world == 0 else 0
        if per_rank == 0:
            raise UserError(
                f"train.global_batch_size ({gbs}) must be divisible by the number of ranks ({world})"
            )
        mbs = max(d for d in range(1, min(per_rank, 8) + 1) if per_rank % d == 0)
    else:
        mbs = spec.train.micro_batch_size
    return mbs, gbs // (mbs * world)


def build_plan(
    spec: JobSpec,
    run_dir: Path,
    *,
    device: str | None = None,
    nnodes: int | None = None,
    counts: ParamCounts | None = None,
) -> tuple[Plan, list[str]]:
    """Resolve `spec` into a Plan. Returns the plan and notices to show the user."""
    notices: list[str] = []
    if device is None:
        device, notice = detect_device(spec.device)
        if notice:
            notices.append(notice)
    nnodes = nnodes or spec.resources.nodes
    nproc = spec.resources.gpus_per_node
    world = nnodes * nproc
    if device == "cuda" and spec.cluster.kind == "local" and nnodes == 1:
        import torch

        visible = torch.cuda.device_count()
        if nproc > visible:
            raise UserError(
                f"resources.gpus_per_node is {nproc} but this machine has {visible} visible GPU(s)",
                f"set resources.gpus_per_node: {visible} (or fewer)",
            )
    if spec.model.attention == "flash_attention_2" and device != "cuda":
        raise UserError(
            "model.attention: flash_attention_2 needs a CUDA GPU", "use attention: sdpa on the CPU"
        )
    if spec.model.dtype == "fp16":
        raise UserError(
            "model.dtype: fp16 training needs a loss scaler, which sharpen does not run",
            "use dtype: bf16 (GPUs since Ampere) or fp32",
        )
    if spec.method.kind in ("dpo", "reward"):
        raise UserError(f"method.kind: {spec.method.kind} is not available in this version of sharpen")
    if spec.strategy.name == "single" and world > 1:
        raise UserError(f"strategy.name: single runs one rank, but resources ask for {world}")
    compute, storage = resolve_dtypes(spec, device)
    counts = counts or count_parameters(spec)
    strategy, why = choose_strategy(spec, counts, compute, storage, world)
    mbs, accum = resolve_micro_batch(spec, world)
    plan = Plan(
        sharpen_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        job=spec.model_dump(mode="json"),
        job_hash=job_hash(spec),
        run_dir=str(Path(run_dir).resolve()),
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        nnodes=nnodes,
        nproc_per_node=nproc,
        world_size=world,
        strategy=strategy,
        strategy_reason=why,
        compute_dtype=compute,
        storage_dtype=storage,
        micro_batch_size=mbs,
        grad_accum=accum,
        global_batch_size=spec.train.global_batch_size,
        params={"total": counts.total, "trainable": counts.trainable, "frozen": counts.frozen},
        state_bytes_per_rank=state_bytes_per_rank(counts, strategy, world, compute, storage),
    )
    return plan, notices


def default_run_dir(spec: JobSpec) -> Path:
    if spec.output_dir:
        return Path(spec.output_dir)
    return Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
