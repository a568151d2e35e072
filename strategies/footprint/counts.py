"""What a footprint is computed over and what it gives: the model's tensors, one rank's setting, its bytes.

Plain data and arithmetic (no torch): launcher/shapes.py fills ParamCounts from a model's config, the
footprints in this package turn it and a Setting into bytes, and the planner adds up a MemoryEstimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import ceil

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantisation: one fp32 absmax per 256 uint8 absmaxes
# Selective checkpointing recomputes a matmul whose output is this many times wider than its contraction
# (strategies/activation_checkpointing.py applies the rule; launcher/shapes.py counts what it keeps).
LOW_RANK = 8
# A mixture of experts: the config fields naming the experts of a layer (Mixtral's; Qwen2/3-MoE's and
# OLMoE's; DeepSeek's routed ones), and the module that holds them in each MoE layer.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERTS_MODULE = "experts"


def routed_experts(config) -> tuple[int, int]:
    """(experts of a mixture-of-experts layer, experts each token is routed to) from a transformers
    config; (0, 0) for a dense model."""
    experts = next((int(n) for f in EXPERT_COUNT_FIELDS if (n := getattr(config, f, None))), 0)
    per_token = int(getattr(config, "num_experts_per_tok", 0) or 0)
    return (experts, per_token) if experts and per_token else (0, 0)


def is_expert_weight(name: str) -> bool:
    """Whether parameter `name` is the experts' (under a module named `experts`: transformers' 3D
    [experts, out, in] tensors, a list of expert MLPs, or LoRA's adapters on them)."""
    return EXPERTS_MODULE in name.split(".")[:-1]


def active_numel(name: str, numel: int, experts: int, per_token: int) -> int:
    """Elements of parameter `name` that a token passes through: of an expert weight per_token of every
    `experts`, of any other all."""
    return numel * per_token // experts if experts and is_expert_weight(name) else numel


@dataclass(frozen=True)
class TensorInfo:
    """One parameter of the trained model, as the loader (training/model.py) leaves it.

    storage: "trainable" (fp32 master weights), "compute" (frozen, in the compute dtype: the LoRA base),
    "fp32" (frozen fp32: what peft's prepare_model_for_kbit_training leaves unquantised under QLoRA) or
    "nf4" (frozen 4-bit: packed bytes plus block scales)."""

    numel: int
    dim0: int  # FSDP2 shards rows (dim 0)
    storage: str
    in_layer: bool  # inside a repeated decoder layer (an FSDP2 group of its own), else in the root group
    matmul: bool  # a weight of a linear layer (autocast casts these to the compute dtype)

    @property
    def trainable(self) -> bool:
        return self.storage == "trainable"


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the model as the job will train it, and the shapes the memory model needs."""

    total: int  # every parameter of the trained model (base + adapters)
    trainable: int
    frozen: int
    frozen_quantized: int  # frozen params held in 4 bits (QLoRA)
    num_layers: int
    hidden_size: int
    vocab_size: int
    # 0: unknown (shape-only counts); the activation model then assumes an intermediate size of 8/3 x hidden
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    qk_norm: bool = False  # an RMSNorm on q and k in attention (Qwen3, OLMoE)
    # A mixture of experts (0: dense): experts in each MoE layer, those a token is routed to, the width of
    # one expert's MLP, the decoder layers that route (the others have a dense MLP of intermediate_size).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    moe_layers: int = 0
    adapted_experts: bool = False  # LoRA adapts the experts' 3D weights (PEFT's ParamWrapper: weight + B·A)
    fp32_routing: bool = False  # the router's top-k weights stay fp32 in a compute-dtype model (Mixtral's)
    # a causal LM of a family whose loss training/kernels/fused_loss.py computes in chunks through its head
    fusable_loss: bool = False
    # Parameters a token passes through (what FLOPs are counted over): the experts' at experts_per_token /
    # num_experts, every other whole. 0: not counted (shape-only counts), read as total (active_params)
    active: int = 0
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False)  # empty: aggregate counts only

    @property
    def active_params(self) -> int:
        return self.active or self.total

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("tensors")
        return out


@dataclass(frozen=True)
class Setting:
    """Everything besides the model that decides one rank's memory."""

    strategy: str  # a registered strategy (strategies.registered_names())
    offload: str = "none"  # none | optimizer | params
    world_size: int = 1
    sequence_parallel: int = 1  # ranks that split each row's tokens (strategy.sequence_parallel)
    rank: int = 0
    compute_dtype: str = "bf16"
    finetune: str = "full"  # full | lora | qlora
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 2048
    attention: str = "sdpa"
    gradient_checkpointing: str = "none"  # none | selective | full | offload (full, kept inputs on the host)
    padding_free: bool = True
    packing: bool = False
    reshard_after_forward: bool = True
    lora_r: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | str = "all-linear"
    double_quant: bool = True
    quant_storage_bytes: int = 2  # element size the packed 4-bit weights are stored in
    device: str = "cuda"
    method: str = "sft"  # dpo and reward rows are (chosen, rejected) pairs: two sequences per sample
    # grpo: a row is a prompt (at most max_length) + a completion (at most this), labels on the completion
    completion_length: int = 0
    generation_rows: int = 0  # grpo: completions a rank generates as one batch with a KV cache (0: none)
    frozen_copy: bool = False  # grpo with beta > 0, full fine-tuning: a frozen reference, sharded as params
    held_model_bytes: int = 0  # grpo: reward models, each whole on every rank in the compute dtype
    # The ranks install training/kernels/ (launcher/candidates.py's setting_for): the loss runs in chunks where
    # the model, method and strategy allow (launcher/shapes.py's chunked_loss). A Setting built by hand models
    # the library's plain loss, as the measured peaks of tests/unit/test_planner.py ran it.
    kernels: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by category. Device bytes, except `offloaded` (host memory of this rank)."""

    params: int
    grads: int
    optimizer: int
    buffers: int  # the strategy's working memory: gathered params, casts, communication buckets
    activations: int  # saved for backward at the peak, logits and loss included
    offloaded: int
    step: int  # device peak during the optimizer step: params + grads + optimizer + the step's temporaries
    # Device peak over forward and backward. Not always the sum of the columns (each at its most within a
    # step): at the loss, where activations peak, single and fsdp hold no gradients yet without
    # accumulation, and FSDP2 has every group resharded (see launcher/candidates.py's estimate()).
    backward: int
    # grpo: frozen models held all step besides the policy (reference copy + reward models), counted in
    # `step`, `backward` and `generation`; and the device peak of the generation phase (0: none)
    frozen_models: int = 0
    generation: int = 0

    @property
    def total(self) -> int:
        """The device peak: the largest of the forward/backward peak, the optimizer step's and generation's."""
        return max(self.backward, self.step, self.generation)

    def to_dict(self) -> dict[str, int]:
        keys = ("params", "grads", "optimizer", "buffers", "activations", "offloaded", "frozen_models", "generation")
        return {**{k: int(getattr(self, k)) for k in keys}, "total": int(self.total)}


def nf4_bytes(numel: int, double_quant: bool = True, storage_bytes: int = 2) -> int:
    """Bytes of one bitsandbytes 4-bit weight: packed nibbles, the block absmaxes and the code tables.

    The packed nibbles sit in elements of the quant storage dtype (the compute dtype by default). With double
    quantisation the absmaxes are uint8 with an fp32 absmax per 256 of them, a 256-entry fp32 code and an
    fp32 offset; without it one fp32 absmax per block. The 16-entry NF4 code is fp32."""
    blocks = ceil(numel / NF4_BLOCK)
    packed = storage_bytes * ceil(numel / (2 * storage_bytes))
    if double_quant:
        scales = blocks + 4 * ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4
    else:
        scales = 4 * blocks
    return packed + scales + 4 * 16


def packed_bytes(t: TensorInfo, s: Setting) -> int:
    """The packed nibbles of a 4-bit weight, without its block scales."""
    return s.quant_storage_bytes * ceil(t.numel / (2 * s.quant_storage_bytes))


def tensors_of(counts: ParamCounts) -> tuple[TensorInfo, ...]:
    """The model's tensors; for shape-only counts (no tensor list) one trainable, one frozen plain and one
    4-bit block, each a single row-sharded tensor: exact up to per-tensor padding."""
    if counts.tensors:
        return counts.tensors
    layer = bool(counts.num_layers)
    out = (
        [TensorInfo(counts.trainable, counts.trainable, "trainable", layer, True)] if counts.trainable else []
    )
    plain = counts.frozen - counts.frozen_quantized
    if plain:
        out.append(TensorInfo(plain, plain, "compute", layer, True))
    if counts.frozen_quantized:
        out.append(TensorInfo(counts.frozen_quantized, counts.frozen_quantized, "nf4", layer, True))
    return tuple(out)
