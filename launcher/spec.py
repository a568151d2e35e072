"""The job file as pydantic models: strict, with field paths and "did you mean" in every error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every section: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    path: str = Field(description="Hub id (org/name) or a local directory with config.json")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; defaults to model.path")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype: auto = bf16 on GPU, fp32 on CPU"
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    revision: str | None = None


class FinetuneSpec(Section):
    type: Literal["full", "lora", "qlora"] = "full"
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    use_dora: bool = False
    use_rslora: bool = False
    # QLoRA quantisation (bitsandbytes)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    quant_storage: Literal["auto", "bf16", "fp16", "fp32", "uint8"] = Field(
        "auto", description="Storage dtype of the 4-bit weights; auto = the compute dtype, so FSDP can shard them"
    )


class SFTMethod(Section):
    kind: Literal["sft"] = "sft"
    train_on: Literal["completion", "all"] = Field(
        "completion", description="Which tokens carry loss: only the completion (default) or the whole text"
    )


class PretrainMethod(Section):
    kind: Literal["pretrain"]


class DPOMethod(Section):
    kind: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reference: Literal["auto", "precompute"] = "auto"


class RewardMethod(Section):
    kind: Literal["reward"]


Method = Annotated[SFTMethod | PretrainMethod | DPOMethod | RewardMethod, Field(discriminator="kind")]


class DataFile(Section):
    path: str = Field(description="A .jsonl/.json/.parquet/.csv file, a directory, or a hub dataset name")
    format: Literal["alpaca", "chat", "text", "preference"] = "alpaca"
    split: str = "train"
    field: str | None = Field(None, description="The column holding the text (text) or messages (chat)")
    weight: float = Field(1.0, gt=0, description="Reserved: sampling weight when mixing files")


class DataSpec(Section):
    train: list[DataFile] = Field(min_length=1)
    eval: list[DataFile] = Field(default_factory=list)
    eval_split: float = Field(0.0, ge=0, lt=1)
    max_length: int = Field(2048, ge=8)
    packing: bool = Field(False, description="Fill rows up to max_length across samples (pretraining-style)")
    padding_free: bool = Field(True, description="Lay a micro-batch's samples end to end (no pad tokens)")
    shuffle: bool = True
    truncation: Literal["right", "drop"] = "right"
    cache_dir: str | None = Field(None, description="Where tokenized data is cached (default ~/.cache/sharpen)")


class TrainSpec(Section):
    micro_batch_size: int | Literal["auto"] = 1
    global_batch_size: int = Field(8, ge=1)
    max_steps: int = Field(100, ge=1)
    lr: float = Field(2e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, description="Clip the global grad norm; null disables")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0)
    seed: int = 0

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or 'auto')")
        return v


class StrategySpec(Section):
    name: Literal["auto", "single", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "auto"
    offload: Literal["none", "optimizer", "params"] = Field(
        "none", description="Offload to CPU: the optimizer state, or (fsdp/zero3) parameters and optimizer"
    )
    reshard_after_forward: bool = True


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1, description="Ranks per node (processes on CPU)")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Plan for GPUs of this size (default: detected)")


class SlurmSpec(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    constraint: str | None = None
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    exclusive: bool = False
    gpu_flag: Literal["gres", "gpus", "none"] = "gres"
    extra_sbatch: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    signal_lead_s: int = Field(120, ge=0)
    requeue: bool = True
    max_requeues: int = Field(3, ge=0)
    launch: Literal["agent", "task_per_rank"] = "agent"


class ClusterSpec(Section):
    kind: Literal["local", "slurm"] = "local"
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)


class WandbSpec(Section):
    project: str
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"


class LoggingSpec(Section):
    every: int = Field(10, ge=1)
    progress: bool = True
    wandb: WandbSpec | None = None


class JobSpec(Section):
    """A whole job file."""

    name: str = Field("sharpen-job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    method: Method = Field(default_factory=SFTMethod)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    output_dir: str | None = Field(None, description="Run directory (default runs/<name>-<timestamp>)")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        world = self.resources.nodes * self.resources.gpus_per_node
        mbs = self.train.micro_batch_size
        if isinstance(mbs, int) and self.train.global_batch_size % (mbs * world):
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({mbs}) x ranks ({world}); "
                f"try global_batch_size {max(1, round(self.train.global_batch_size / (mbs * world))) * mbs * world}"
            )
        if self.finetune.type == "qlora" and self.model.dtype == "fp16" and self.strategy.name in ("fsdp",):
            pass  # allowed: fp16 storage shards fine
        if self.method.kind in ("dpo", "reward"):
            bad = [f.path for f in self.data.train if f.format != "preference"]
            if bad:
                raise ValueError(
                    f"method.kind {self.method.kind!r} needs data.train files with format: preference, "
                    f"got another format for {', '.join(bad)}"
                )
        elif any(f.format == "preference" for f in self.data.train):
            raise ValueError(
                f"format: preference data needs method.kind dpo or reward, not {self.method.kind!r}"
            )
        if self.method.kind == "pretrain" and any(f.format != "text" for f in self.data.train):
            raise ValueError("method.kind pretrain reads format: text data only")
        if self.train.warmup_steps >= self.train.max_steps and self.train.warmup_steps > 0:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be below train.max_steps ({self.train.max_steps})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.gpus_per_node


def resolve_path(path: str, base: Path) -> str:
    """A relative local path in a job file is relative to the job file's directory when it exists there."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    return str(candidate.resolve()) if candidate.exists() else path


def json_schema() -> dict[str, Any]:
    """The JSON schema of a job file (for editors)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sharpen job file"
    return schema
