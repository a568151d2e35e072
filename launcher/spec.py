"""The job file as pydantic models: strict, with field paths and "did you mean" in every error."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from launcher.method_spec import (  # noqa: F401  (the method sections are part of this module's schema)
    METHOD_FORMATS,
    SEQUENCE_PARALLEL_METHODS,
    SUPERVISED_FORMATS,
    DPOMethod,
    GenerationSpec,
    GRPOMethod,
    KTOMethod,
    Method,
    ORPOMethod,
    PretrainMethod,
    RewardMethod,
    RewardSpec,
    Section,
    SFTMethod,
    SimPOMethod,
)

Checkpointing = Literal["none", "selective", "full", "offload"]
CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)  # from the least recompute to the most
# Rules this module cannot state because they depend on what a strategy can run (strategies/job_rules.py,
# which imports this contract module, not the other way round): `JobSpec.model_validate(raw,
# context={RULES_CONTEXT: [rule, ...]})` checks them with the others, each rule a JobSpec's (field, message) list.
RULES_CONTEXT = "rules"
Rule = Callable[["JobSpec"], list[tuple[str, str]]]

# model.chat_template's built-in names: training/data/templates/NAME.jinja each.
CHAT_TEMPLATES = ("chatml", "llama3", "mistral", "gemma", "qwen", "phi3")
# The fields of each data format's records, the names `columns:` maps (the first listed may also be `field:`).
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "feedback": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
# The roles a conversation's messages take, and sharegpt's defaults for the file's own role names.
CHAT_ROLES = ("system", "user", "assistant", "tool")
ChatRole = Literal["system", "user", "assistant", "tool"]
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant",
}


class ModelSpec(Section):
    """The base model: where it comes from and how it is loaded."""

    path: str = Field(description="Hub id (org/name) or a local directory with config.json")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; defaults to model.path")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype: auto = bf16 on GPU, fp32 on CPU"
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch), eager, or flash_attention_2 (CUDA only, needs flash-attn)",
    )
    gradient_checkpointing: Checkpointing = Field(
        "none",
        description=(
            "Recompute activations in the backward pass. full: each decoder layer keeps only its input (least "
            "memory, about a third more compute); selective: it also keeps its matmul and attention outputs and "
            "recomputes only the cheap ops (norms, rotary, SiLU): about half the activations of none, no large "
            "matmul run twice (on a CPU, torch's per-op bookkeeping makes it slower than full); offload: full, with "
            "each layer's kept input moved to host memory until the backward needs it (GPU memory of long rows). "
            "true and false mean full and none"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile each decoder layer (they share code, so it compiles once): fused kernels for the "
            "norms, rotary, MLP and LoRA arithmetic; the first steps wait for the compiler. Not with zero1-3"
        ),
    )
    cpu_matmul: Literal["auto", "aten", "onednn"] = Field(
        "auto",
        description=(
            "Kernel of an fp32 CPU run's matmuls: aten (torch's own, MKL's sgemm) or onednn (oneDNN's matmul, "
            "twice as fast on AMD cores where MKL runs its AVX2 code). auto times both once per machine and "
            "takes oneDNN where it is clearly faster; one choice for every rank of the job. No effect on GPUs "
            "or in bf16"
        ),
    )
    router_aux_loss_coef: float | None = Field(
        None,
        ge=0,
        description=(
            "Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): the weight of the router's load-balancing "
            "loss added to the training loss (sft, pretrain; the other methods train without it) and logged as router_aux_loss; default the model "
            "config's router_aux_loss_coef, 0 logs it without training on it"
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint (transformers' trust_remote_code)"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of model.path (default: main)")
    chat_template: str | None = Field(
        None,
        description=(
            "The chat template chat and sharegpt data are rendered with, in place of the tokenizer's: a built-in "
            f"({', '.join(CHAT_TEMPLATES)}) or the path of a .jinja file; saved with the tokenizer in final/. "
            "Needed for a base model whose tokenizer has none"
        ),
    )

    @field_validator("chat_template")
    @classmethod
    def _template_name(cls, v: str | None) -> str | None:
        if v is None or v in CHAT_TEMPLATES or v.endswith(".jinja"):
            return v
        close = difflib.get_close_matches(v.lower(), CHAT_TEMPLATES, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{guess}{v!r} is not a built-in template ({', '.join(CHAT_TEMPLATES)}) nor a .jinja file")

    @field_validator("gradient_checkpointing", mode="before", json_schema_input_type=Checkpointing | bool)
    @classmethod
    def _checkpointing_from_bool(cls, v: Any) -> Any:
        """true and false, the field's values before selective existed, still mean full and none."""
        if isinstance(v, bool):
            return "full" if v else "none"
        return v


class FinetuneSpec(Section):
    """What is trained: every weight, or LoRA adapters over a (4-bit, for qlora) frozen base."""

    type: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="full: train every weight; lora: low-rank adapters; qlora: LoRA over a 4-bit base model",
    )
    r: int = Field(16, ge=1, description="LoRA rank (lora, qlora)")
    alpha: float = Field(
        32,
        gt=0,
        description="LoRA scale numerator: updates are scaled by alpha/r (alpha/sqrt(r) with use_rslora)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the input of each LoRA adapter")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description=(
            "Modules that get adapters: all-linear (every linear layer but the output head; on a mixture-of-experts "
            "model also its routers and experts) or names, e.g. [q_proj, v_proj], where `experts` names the experts' "
            "3D weights"
        ),
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head]",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA)")
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r"
    )
    # QLoRA quantisation (bitsandbytes)
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the qlora base weights")
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (about 0.4 bits per weight less)"
    )
    quant_storage: Literal["auto", "bf16", "fp16", "fp32", "uint8"] = Field(
        "auto",
        description="Storage dtype of the 4-bit weights; auto = the compute dtype, so FSDP can shard them",
    )


class DataFile(Section):
    """One data file or dataset, an item of data.train or data.eval."""

    path: str = Field(description="A .jsonl/.json/.parquet/.csv file, a directory, or a hub dataset name")
    format: Literal["alpaca", "chat", "sharegpt", "text", "preference", "prompt", "feedback"] = Field(
        "alpaca",
        description=(
            "alpaca (instruction, input, output), chat (messages of role and content), sharegpt (conversations "
            "of from and value), text (raw text), preference (prompt, chosen, "
            "rejected), feedback (prompt, completion, label: true/false, for kto), prompt (a prompt to generate from, for grpo; every other field reaches the reward functions)"
        ),
    )
    columns: dict[str, str] | None = Field(
        None,
        description=(
            "The format's fields read from the file's own columns, e.g. {instruction: question, output: answer} "
            "(alpaca), {prompt: query, chosen: good, rejected: bad} (preference)"
        ),
    )
    roles: dict[str, ChatRole] | None = Field(
        None,
        description=(
            "Message lists (chat, sharegpt; preference, feedback, prompt given as messages): the file's role names "
            "as system, user, assistant or tool, e.g. {bot: assistant}; added to the defaults (chat: those four; "
            "sharegpt: human, gpt, system, tool, function, observation, function_call)"
        ),
    )

    @model_validator(mode="after")
    def _columns_and_roles(self) -> DataFile:
        fields = FORMAT_FIELDS[self.format]
        unknown = [k for k in self.columns or {} if k not in fields]
        if unknown:
            raise ValueError(
                f"columns: {', '.join(repr(k) for k in unknown)} is not a field of format {self.format} "
                f"(its fields: {', '.join(fields)}); map each as {{field: your_column}}"
            )
        if self.columns and self.field:
            raise ValueError(f"give field or columns, not both; e.g. columns: {{{fields[0]}: {self.field}}}")
        if self.roles and self.format in ("alpaca", "text"):
            raise ValueError(f"roles apply to message lists (chat, sharegpt, preference, feedback, prompt), not format {self.format}")
        return self

    split: str = Field("train", description="Split to read from a hub dataset or a dataset directory")
    field: str | None = Field(
        None, description="The column holding the text (text), the messages (chat) or the prompt (prompt)"
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="data.train: this source's share of the samples drawn, as weight over the sum of the sources' "
        "weights (0.7 and 0.3: 70% and 30%, whatever their sizes); give every source a weight or none (none: one "
        "shuffled pool, each record once an epoch). A source drawn more than it has records repeats; `sharpen plan` "
        "shows each share and its epochs",
    )


def mixing(weights: list[float | None]) -> bool:
    """Whether data.train's weights mix its sources: a weight on each of several (DataSpec allows all or none)."""
    return len(weights) > 1 and all(w is not None for w in weights)


class DataSpec(Section):
    """Training and evaluation data, and how samples become token rows."""

    train: list[DataFile] = Field(min_length=1, description="Training files, at least one")
    eval: list[DataFile] = Field(default_factory=list, description="Evaluation files")
    eval_split: float = Field(
        0.0, ge=0, lt=1, description="Share of the training data held out for evaluation (0: none)"
    )
    max_length: int = Field(2048, ge=8, description="Tokens per sample (or per packed row); see truncation")
    packing: bool = Field(False, description="Fill rows up to max_length across samples (pretraining-style)")
    padding_free: bool = Field(True, description="Lay a micro-batch's samples end to end (no pad tokens)")
    shuffle: bool = Field(True, description="Shuffle the training samples (seeded by train.seed)")
    truncation: Literal["right", "drop"] = Field(
        "right", description="Samples longer than max_length: right cuts their end, drop skips them"
    )
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached (default ~/.cache/sharpen)"
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes that tokenize the data (null: the cores available); the cache is the same"
    )

    @model_validator(mode="after")
    def _weights_on_every_source_or_none(self) -> DataSpec:
        given = [f.weight is not None for f in self.train]
        if any(given) and not all(given):
            missing = ", ".join(f"train.{i}" for i, g in enumerate(given) if not g)
            raise ValueError(
                f"weights are shares of the whole mix: give every data.train source a weight, or none ({missing} has none)"
            )
        eval_weighted = [f"eval.{i}" for i, f in enumerate(self.eval) if f.weight is not None]
        if eval_weighted:
            raise ValueError(f"{', '.join(eval_weighted)}: a weight mixes training sources; evaluation files are not drawn")
        return self


class TrainSpec(Section):
    """Batch sizes, the optimizer (AdamW) and its schedule, and checkpoint cadence."""

    micro_batch_size: int | Literal["auto"] = Field(
        1, description="Samples per rank per forward/backward pass; auto: the largest the memory plan allows"
    )
    global_batch_size: int = Field(
        8,
        ge=1,
        description="Samples per optimizer step over all ranks; accumulation = global / (micro x ranks)",
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train for")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final learning rate as a share of lr (cosine, linear)"
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning rate decay after warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW beta1, beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, description="Clip the global grad norm; null disables")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted")
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps (0: never); needs data.eval or data.eval_split"
    )
    seed: int = Field(0, description="Seed of initialisation, data order and dropout")
    hang_timeout_s: int | None = Field(
        None,
        ge=1,
        description="Seconds without progress on any rank before the run is stopped as hung, naming where each "
        "rank waits (null: the largest of 300 s, 10x the slowest step and the start-up; start-up and checkpoints "
        "get at least 1800 s)",
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or 'auto')")
        return v


class StrategySpec(Section):
    """How the model, gradients and optimizer state are placed across ranks."""

    name: Literal["auto", "single", "ddp", "fsdp", "zero1", "zero2", "zero3"] = Field(
        "auto",
        description="auto (chosen by the plan), single (one rank), ddp, fsdp (FSDP2), zero1/zero2/zero3 (DeepSpeed ZeRO)",
    )
    offload: Literal["none", "optimizer", "params"] = Field(
        "none", description="Offload to CPU: the optimizer state, or (fsdp/zero3) parameters and optimizer"
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp: free gathered parameters after forward (less memory, one more all-gather in backward)",
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        description=(
            "Split each row's tokens into this many contiguous chunks over a group of as many ranks (Ulysses: "
            "an all-to-all from sequence shards to head shards around attention, and back), so a row too long "
            "for one GPU's activations trains; data parallelism runs over ranks / sequence_parallel groups. "
            "sft and pretrain, padding-free rows, attention sdpa"
        ),
    )


class ResourcesSpec(Section):
    """How many machines and ranks; ranks = nodes x gpus_per_node."""

    nodes: int = Field(1, ge=1, description="Machines (SLURM nodes)")
    gpus_per_node: int = Field(1, ge=1, description="Ranks per node (processes on CPU)")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Plan for GPUs of this size (default: detected)"
    )


class SlurmSpec(Section):
    """sbatch options for cluster.kind slurm (`sharpen submit`)."""

    partition: str | None = Field(None, description="Partition (--partition); default: the cluster's")
    account: str | None = Field(None, description="Account to charge (--account)")
    qos: str | None = Field(None, description="Quality of service (--qos)")
    time: str = Field("24:00:00", description="Wall-clock limit (--time), e.g. 24:00:00 or 2-00:00:00")
    constraint: str | None = Field(None, description="Node features (--constraint), e.g. a GPU type")
    cpus_per_task: int | None = Field(
        None, ge=1, description="CPUs per task (--cpus-per-task); default: SLURM's"
    )
    mem: str | None = Field(None, description="Memory per node (--mem), e.g. 256G")
    exclusive: bool = Field(False, description="Whole nodes only (--exclusive)")
    gpu_flag: Literal["gres", "gpus", "none"] = Field(
        "gres", description="How GPUs are asked for: --gres=gpu:N, --gpus-per-node=N, or not at all"
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="More #SBATCH options, e.g. [--mail-type=END]"
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the ranks start (module load ..., source ...)",
    )
    signal_lead_s: int = Field(
        120, ge=0, description="Seconds before the time limit at which the job is signalled to checkpoint"
    )
    requeue: bool = Field(
        True, description="Requeue after preemption or the time limit, resuming from a checkpoint"
    )
    max_requeues: int = Field(3, ge=0, description="Most times a job requeues itself")
    signal: Literal["USR2", "USR1", "URG"] = Field(
        "USR2",
        description="The signal SLURM sends signal_lead_s before the time limit, and that asks a running job to "
        "checkpoint and requeue however it is sent (batch shell, steps, one rank)",
    )
    grace_s: int | None = Field(
        None,
        ge=0,
        description="After SIGTERM (preemption, scancel), checkpoint at the next step boundary if it comes within "
        "this many seconds, else exit without one (null: half the site's GraceTime + KillWait, read at submit)",
    )
    launch: Literal["agent", "task_per_rank"] = Field(
        "agent",
        description="agent: one task per node starts the ranks; task_per_rank: srun starts every rank",
    )


class ClusterSpec(Section):
    """Where the ranks run."""

    kind: Literal["local", "slurm"] = Field(
        "local", description="local: this machine (`sharpen run`); slurm: a SLURM job (`sharpen submit`)"
    )
    rendezvous_timeout_s: int = Field(
        900,
        ge=1,
        description="Seconds the nodes of a multi-node run wait for each other to start before the run stops, "
        "naming the nodes that did not arrive",
    )
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="SLURM options, used when kind is slurm")


class WandbSpec(Section):
    """Weights & Biases tracking."""

    project: str = Field(description="W&B project")
    entity: str | None = Field(None, description="W&B team or user (default: yours)")
    name: str | None = Field(None, description="Run name (default: the job name)")
    tags: list[str] = Field(default_factory=list, description="Run tags")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online, offline (upload later with `wandb sync`), or disabled"
    )


class MlflowSpec(Section):
    """MLflow tracking (the `sharpen[mlflow]` extra): the plan as parameters, metrics per step."""

    tracking_uri: str | None = Field(
        None,
        description="Tracking server or store: http(s)://HOST:PORT, databricks, sqlite:///PATH/mlflow.db "
        "(default: MLFLOW_TRACKING_URI from the ranks' environment, else sqlite:///RUN/mlflow.db)",
    )
    experiment: str | None = Field(None, description="Experiment name (default: the job name)")
    run_name: str | None = Field(None, description="Run name (default: the run directory's name)")


class TensorboardSpec(Section):
    """TensorBoard event files (the `sharpen[tensorboard]` extra): every metric as a scalar per step."""

    dir: str | None = Field(
        None, description="Directory of the event files (default RUN/tensorboard; a relative path is under RUN)"
    )


class LoggingSpec(Section):
    """Metrics: the run directory's metrics.jsonl always; W&B, MLflow and TensorBoard when configured."""

    every: int = Field(10, ge=1, description="Log metrics every N optimizer steps")
    progress: bool = Field(True, description="Show a progress bar on rank 0")
    wandb: WandbSpec | None = Field(None, description="Weights & Biases tracking; omit to log locally only")
    mlflow: MlflowSpec | None = Field(None, description="MLflow tracking; omit for none")
    tensorboard: TensorboardSpec | None = Field(None, description="TensorBoard event files; omit for none")
    samples: int = Field(
        3, ge=0, le=20,
        description="Eval prompts completed greedily (48 new tokens) before and after training, in report.md; 0: none",
    )


class JobSpec(Section):
    """A whole job file."""

    name: str = Field(
        "sharpen-job",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Job name: letters, digits, '.', '_', '-'; names the run directory and the SLURM job",
    )
    model: ModelSpec = Field(description="The base model")
    finetune: FinetuneSpec = Field(
        default_factory=FinetuneSpec, description="Full fine-tuning, LoRA or QLoRA"
    )
    method: Method = Field(
        default_factory=SFTMethod, description="The training objective, chosen by method.kind"
    )
    data: DataSpec = Field(description="Training and evaluation data")
    train: TrainSpec = Field(
        default_factory=TrainSpec, description="Batch sizes, optimizer, schedule, checkpoints"
    )
    strategy: StrategySpec = Field(default_factory=StrategySpec, description="Data parallelism and sharding")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Nodes and ranks per node")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Local run or SLURM job")
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Metrics and experiment tracking")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: cuda when a GPU is visible, else cpu (gloo); cuda; or cpu"
    )
    output_dir: str | None = Field(None, description="Run directory (default runs/<name>-<timestamp>)")

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> JobSpec:
        """Rules that span sections; all broken ones are reported at once, each under its primary field.
        The validation context may add rules under RULES_CONTEXT (see its comment)."""
        problems = self._rule_violations((info.context or {}).get(RULES_CONTEXT, ()))
        if problems:
            summary = "; ".join(f"{field}: {message}" for field, message in problems)
            raise PydanticCustomError("cross_field", "{summary}", {"summary": summary, "problems": problems})
        return self

    def _rule_violations(self, extra_rules: Sequence[Rule] = ()) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        add = problems.append
        train, world = self.train, self.world_size
        mbs, gbs = train.micro_batch_size, train.global_batch_size
        degree = self.strategy.sequence_parallel
        if world % degree:
            fits = [n for n in range(1, world + 1) if world % n == 0]
            add(("strategy.sequence_parallel", f"{degree} does not divide the {world} ranks (resources.nodes x "
                 f"gpus_per_node): a sequence is split over a group of that many ranks; try {one_of(map(str, fits))}"))
            degree = 1
        data_ranks = world // degree
        if degree > 1:
            problems += sequence_parallel_rules(self)
        if isinstance(mbs, int) and gbs % (mbs * data_ranks):
            step = mbs * data_ranks
            options = " or ".join(str(n) for n in (gbs // step * step, (gbs // step + 1) * step) if n > 0)
            ranks = f"ranks ({mbs} x {world}" if degree == 1 else f"data-parallel groups, ranks / sequence_parallel ({mbs} x {data_ranks}"
            why = f"train.micro_batch_size x {ranks} = {step})"
            add(("train.global_batch_size", f"{gbs} is not divisible by {why}; try {options}"))
        kind = self.method.kind
        reads = METHOD_FORMATS.get(kind, SUPERVISED_FORMATS)
        readers = {fmt: [k for k, formats in METHOD_FORMATS.items() if fmt in formats] for fmt in ("preference", "prompt", "feedback")}
        for split in ("train", "eval"):
            for i, f in enumerate(getattr(self.data, split)):
                if f.format not in reads:
                    tip = f"; {f.format} data is for method.kind {one_of(readers[f.format])}" if f.format in readers else ""
                    why = f"{f.format!r} does not fit method.kind {kind!r}, which reads format {one_of(reads)}"
                    add((f"data.{split}.{i}.format", why + tip))
        if isinstance(self.method, GRPOMethod) and gbs % self.method.num_generations:
            group = self.method.num_generations
            step = math.lcm(group, mbs * world) if isinstance(mbs, int) else group  # hints that fit both rules
            options = " or ".join(str(n) for n in (gbs // step * step, (gbs // step + 1) * step) if n > 0)
            why = f"completions per step, is not a multiple of method.num_generations ({group}, one group per prompt)"
            add(("train.global_batch_size", f"{gbs}, the {why}; try {options}"))
        if isinstance(self.method, GRPOMethod) and (self.data.eval or self.data.eval_split or train.eval_every):
            where = "data.eval" if self.data.eval else "data.eval_split" if self.data.eval_split else "train.eval_every"
            add((where, "grpo runs have no evaluation yet (the reward of the logged steps is in metrics.jsonl); "
                 "remove data.eval, data.eval_split and train.eval_every"))
        if isinstance(self.method, KTOMethod) and gbs < 2:
            add(("train.global_batch_size", "kto needs at least 2 completions a step: its KL estimate pairs each "
                 "prompt with another record's completion; try 8"))
        if train.warmup_steps and train.warmup_steps >= train.max_steps:
            add(
                (
                    "train.warmup_steps",
                    f"{train.warmup_steps} must be below train.max_steps ({train.max_steps})",
                )
            )
        if train.eval_every and not (self.data.eval or self.data.eval_split):
            why = "but there is no eval data: add data.eval or data.eval_split"
            add(("train.eval_every", f"{train.eval_every}, {why}"))
        for rule in extra_rules:  # the strategies' capability rules, handed in by the job loader
            problems += rule(self)
        method = self.method
        if isinstance(method, DPOMethod) and method.label_smoothing and method.loss != "sigmoid":
            why = f"applies to loss sigmoid only, not {method.loss!r}"
            add(("method.label_smoothing", f"{why}; set it to 0 or use loss: sigmoid"))
        return problems

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.gpus_per_node


def sequence_parallel_rules(spec: JobSpec) -> list[tuple[str, str]]:
    """What strategy.sequence_parallel > 1 needs of the rest of the job file (the model's heads are checked
    against its config by launcher/sequence_rules.py)."""
    problems, degree = [], spec.strategy.sequence_parallel
    why = f"strategy.sequence_parallel {degree} splits each row's tokens over {degree} ranks"
    if spec.method.kind not in SEQUENCE_PARALLEL_METHODS:
        problems.append(("strategy.sequence_parallel", f"{degree}: method.kind {spec.method.kind} cannot split its rows "
                         f"yet (sequence parallelism trains {one_of(SEQUENCE_PARALLEL_METHODS)}); set it to 1"))
    if not spec.data.padding_free:
        problems.append(("data.padding_free", f"false, but {why}, laid end to end as one padding-free row; "
                         "set data.padding_free: true"))
    if spec.model.attention != "sdpa":
        problems.append(("model.attention", f"{spec.model.attention}, but {why}, and runs attention through sdpa on "
                         "each rank's heads; set model.attention: sdpa"))
    if spec.model.compile:
        problems.append(("model.compile", f"true, but {why}, whose all-to-alls around attention are not compiled "
                         "yet; set model.compile: false"))
    return problems


def one_of(names) -> str:
    """`a`, `a or b`, `a, b or c`."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


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
