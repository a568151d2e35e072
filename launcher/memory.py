"""A model's shape from its config alone (meta device), and what each rank holds under each strategy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from launcher.errors import UserError
from launcher.spec import JobSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model as the job will train it."""

    total: int  # every parameter of the trained model (base + adapters)
    trainable: int
    frozen: int
    frozen_quantized: int  # frozen params held in 4 bits (QLoRA)
    num_layers: int
    hidden_size: int
    vocab_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(spec: JobSpec):
    """The model's transformers config from a local dir or hub id, with a clear error when it is neither."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            spec.model.path, trust_remote_code=spec.model.trust_remote_code, revision=spec.model.revision
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.path: cannot read a model config from {spec.model.path!r} ({first})",
            "give a local directory holding config.json, or a hub id reachable from this machine",
        ) from None


def count_parameters(spec: JobSpec) -> ParamCounts:
    """Count parameters on the meta device: no weights are read, so a 70B plan takes seconds."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    ft = spec.finetune
    if ft.type == "full":
        trainable, frozen, quantized = total, 0, 0
    else:
        trainable = 0
        quantized = 0
        targets = ft.target_modules
        output_layer = model.get_output_embeddings()
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is output_layer:
                continue
            if targets != "all-linear" and not any(name == t or name.endswith("." + t) for t in targets):
                continue
            trainable += ft.r * (module.in_features + module.out_features)
            if ft.use_dora:
                trainable += module.out_features
        for name, module in model.named_modules():
            if any(name == m or name.endswith("." + m) for m in ft.modules_to_save):
                trainable += sum(p.numel() for p in module.parameters())
        frozen = total
        if ft.type == "qlora":
            quantized = sum(
                m.weight.numel()
                for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m is not output_layer
            )
        total = total + trainable
    return ParamCounts(
        total=total,
        trainable=trainable,
        frozen=frozen,
        frozen_quantized=quantized,
        num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
    )


def state_bytes_per_rank(
    counts: ParamCounts, strategy: str, world_size: int, compute_dtype: str, storage_dtype: str
) -> dict[str, int]:
    """Bytes of params, grads and optimizer state (AdamW) each rank holds, before activations.

    Trainable params are fp32 masters; with bf16 compute the strategies also keep a bf16 copy for the
    forward (the ZeRO paper's 2+2+12 = 16 bytes per parameter). Frozen params stay in their storage
    dtype (4-bit for QLoRA: half a byte plus ~1/64 for the block scales).
    """
    mixed = compute_dtype != "fp32"
    frozen_plain = counts.frozen - counts.frozen_quantized
    frozen_bytes = frozen_plain * DTYPE_BYTES[storage_dtype] + int(counts.frozen_quantized * (0.5 + 1 / 64))
    param_bytes = counts.trainable * (4 + (2 if mixed else 0)) + frozen_bytes
    grad_bytes = counts.trainable * (2 if mixed and strategy in ("zero1", "zero2", "zero3") else 4)
    optim_bytes = counts.trainable * 8  # AdamW: exp_avg + exp_avg_sq in fp32
    if mixed and strategy in ("zero1", "zero2", "zero3"):
        # DeepSpeed keeps the fp32 master copy inside the optimizer; the module holds the bf16 params.
        param_bytes = counts.trainable * 2 + frozen_bytes
        optim_bytes += counts.trainable * 4
    shard = max(1, world_size)
    if strategy in ("zero1", "zero2", "zero3", "fsdp"):
        optim_bytes //= shard
    if strategy in ("zero2", "zero3", "fsdp"):
        grad_bytes //= shard
    if strategy in ("zero3", "fsdp"):
        param_bytes //= shard
    return {
        "params": int(param_bytes),
        "grads": int(grad_bytes),
        "optimizer": int(optim_bytes),
        "total": int(param_bytes + grad_bytes + optim_bytes),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
