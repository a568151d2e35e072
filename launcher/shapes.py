"""A model's shape from its config alone (meta device): every tensor the job trains or keeps frozen, and the
activations of one micro-batch through it.

What each rank holds under each strategy is that strategy's footprint (strategies/footprint/), computed
from these counts. Nothing here imports deepspeed or reads weights, so a 70B plan takes seconds on a laptop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from math import ceil

from launcher.errors import UserError
from launcher.method_spec import PAIR_METHODS
from launcher.spec import JobSpec
from strategies import footprint
from strategies.footprint.counts import (
    DTYPE_BYTES,
    EXPERTS_MODULE,
    LOW_RANK,
    ParamCounts,
    Setting,
    TensorInfo,
    active_numel,
    is_expert_weight,
    routed_experts,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_TARGETS = frozenset(LORA_TARGETS[4:])  # a dense MLP's linears; an MoE layer's experts are 3D, no linear


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
    """Every tensor of the trained model, from the config on the meta device (no weights are read).

    full: every weight trainable. lora and qlora: the adapters PEFT itself builds from the job's LoraConfig
    (training/model.py's lora_config: r x (in + out) per targeted linear layer, all but the output head for
    all-linear; DoRA magnitudes; trainable copies of modules_to_save), over the base frozen in the compute
    dtype; qlora: the base's linear weights in 4 bits.

    A mixture of experts counts every expert (each rank holds them all: trained under full, frozen under
    LoRA; they are no linear layer, so QLoRA does not quantise them) and `active` what a token passes
    through: of the experts' weights experts_per_token / num_experts. PEFT's all-linear also adapts the
    router and the experts' 3D weights (its ParamWrapper, rank r per expert, 2r for the fused gate-up)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from strategies.base import decoder_layer_classes
    from training.kernels.fused_loss import SUPPORTED as FUSED_LOSS_FAMILIES

    config = load_config(spec)
    reward = spec.method.kind == "reward"  # a one-unit `score` head instead of the vocabulary projection
    if reward:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    ft = spec.finetune
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        output_layer = getattr(model, "score", None) if reward else model.get_output_embeddings()
        fusable_loss = type(model).__name__ in FUSED_LOSS_FAMILIES and type(output_layer) is torch.nn.Linear
        experts, per_token = routed_experts(config)
        fp32_routing = bool(experts) and _fp32_routing(model, per_token)
        if ft.type != "full":
            model = _with_adapters(model, spec)
    layers = decoder_layer_classes(model)  # the groups FSDP2 shards one by one
    in_layer = {id(p) for m in model.modules() if isinstance(m, layers) for p in m.parameters()}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    output_weights = {id(p) for p in output_layer.parameters()} if output_layer is not None else set()
    tensors: list[TensorInfo] = []
    active = 0
    adapted_experts = False
    for name, param in model.named_parameters():  # tied parameters once
        active += active_numel(name, param.numel(), experts, per_token)
        linear = id(param) in linear_weights
        if ft.type == "full" or param.requires_grad:
            storage = "trainable"
            adapted_experts |= ft.type != "full" and bool(experts) and is_expert_weight(name)
        elif ft.type == "qlora" and linear and id(param) not in output_weights:
            storage = "nf4"
        else:
            storage = "fp32" if ft.type == "qlora" else "compute"
        # adapters and modules_to_save copies (an embedding's too) are multiplied as the layer they adapt
        matmul = linear or (ft.type != "full" and storage == "trainable" and param.dim() > 1)
        tensors.append(TensorInfo(param.numel(), param.shape[0], storage, id(param) in in_layer, matmul))
    trainable = sum(t.numel for t in tensors if t.trainable)
    total = sum(t.numel for t in tensors)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 0)
    # the layers that route to experts (Qwen3-MoE's decoder_sparse_step and mlp_only_layers keep others dense)
    moe_layers = len({n.split(f".{EXPERTS_MODULE}.")[0] for n, _ in model.named_parameters() if is_expert_weight(n)})
    return ParamCounts(
        total=total,
        trainable=trainable,
        frozen=total - trainable,
        frozen_quantized=sum(t.numel for t in tensors if t.storage == "nf4"),
        num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden_size=hidden,
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0)),
        qk_norm=any(n.endswith((".q_norm.weight", ".k_norm.weight")) for n, _ in model.named_parameters()),
        num_experts=experts,
        experts_per_token=per_token,
        expert_intermediate_size=int(getattr(config, "moe_intermediate_size", 0) or intermediate) if experts else 0,
        moe_layers=moe_layers if experts else 0,
        adapted_experts=adapted_experts,
        fp32_routing=fp32_routing,
        fusable_loss=fusable_loss,
        active=active,
        tensors=tuple(tensors),
    )


def _fp32_routing(model, per_token: int) -> bool:
    """Whether the first MoE layer's router (the `gate` beside its `experts`) gives fp32 top-k weights to a
    bf16 model, as Mixtral's does (Qwen3-MoE's and OLMoE's cast them to the compute dtype): a copy of it
    run on the meta device. True where that cannot be told (the larger temporaries)."""
    import copy

    import torch

    name = next((n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == EXPERTS_MODULE), None)
    try:
        router = copy.deepcopy(model.get_submodule(name.rsplit(".", 1)[0] + ".gate")).to(torch.bfloat16)
        hidden = next(p.shape[-1] for p in router.parameters())
        with torch.no_grad():
            out = router(torch.empty(4, hidden, device="meta", dtype=torch.bfloat16))
        weights = [t for t in out if torch.is_tensor(t) and t.is_floating_point() and tuple(t.shape) == (4, per_token)]
        return weights[0].dtype == torch.float32
    except Exception:  # another router's signature: assume the larger
        return True


def _with_adapters(model, spec: JobSpec):
    """`model` (on the meta device) with the job's LoRA adapters, as PEFT builds them for training; a
    setting PEFT refuses for this model is the job's mistake, said before any rank starts."""
    from peft import get_peft_model

    from training.model import lora_config

    try:
        with warnings.catch_warnings():  # PEFT's notes on converting MoE targets are not the user's to act on
            warnings.simplefilter("ignore")
            return get_peft_model(model, lora_config(spec, model))
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "check finetune.target_modules against the model's module names"
        if routed_experts(model.config)[0]:
            hint += ("; PEFT's adapters on the experts' 3D weights (all-linear reaches them) take no dropout and "
                     "no DoRA: set finetune.dropout: 0 and use_dora: false, or name only linear layers")
        raise UserError(f"finetune: PEFT cannot adapt {spec.model.path!r} with these settings ({first})", hint) from None


# -- activations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qk_norm: bool = False
    # a mixture of experts (0: dense): experts a layer holds, those a token is routed to, one expert's
    # MLP width, the layers that route
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    moe_layers: int = 0

    @classmethod
    def of(cls, counts: ParamCounts) -> tuple[ModelShape, list[str]]:
        notes = []
        h = counts.hidden_size
        heads = counts.num_attention_heads or max(1, h // 128)
        inter = counts.intermediate_size or ceil(8 * h / 3)
        if not (counts.num_attention_heads and counts.intermediate_size):
            notes.append("activations estimated from hidden size alone (no heads or intermediate size known)")
        kv = counts.num_key_value_heads or heads
        moe = counts.num_experts and counts.experts_per_token
        return cls(
            h, counts.num_layers, heads, kv, counts.head_dim or h // heads, inter, counts.vocab_size,
            counts.qk_norm, counts.num_experts if moe else 0, counts.experts_per_token if moe else 0,
            (counts.expert_intermediate_size or inter) if moe else 0,
            min(counts.num_layers, counts.moe_layers or counts.num_layers) if moe else 0,
        ), notes  # fmt: skip


def activation_phases(counts: ParamCounts, s: Setting) -> tuple[tuple[int, int], list[str]]:
    """((at the loss, in the layers' backward), notes): activation bytes at the two moments a step can
    peak. At the loss: everything the layers saved plus the loss over the vocabulary. In the layers'
    backward: what the layers saved plus one layer's backward temporaries (with checkpointing: the kept
    layer inputs, with selective also the other layers' kept matmul outputs, plus one recomputed layer). The
    strategy adds what it holds at each moment (its footprint's held_in_backward: e.g. no gradients yet at
    the loss without accumulation, no gathered FSDP2 groups).

    Peak bytes of activations of one micro-batch in a Llama-style decoder: what autograd saves for the
    backward, the attention mask, and the loss (fp32 log-softmax over batch x length x vocab).

    Worst case: every sample max_length tokens. Padding-free batches lay a micro-batch end to end in one row
    of micro_batch x max_length tokens; with several samples in a row sdpa and eager get a 4D block mask of
    T^2 (bool, once) and sdpa converts it to a float mask in the compute dtype in every layer, which that
    layer keeps for its backward. Dtypes follow the strategy: those whose footprint says `autocast`
    (single, ddp) autocast over fp32 trainable weights (fp32 residual stream, a bf16 copy of each linear's
    input per linear), the others (fsdp, zero) run the model in the compute dtype (one shared copy);
    QLoRA's unquantised weights are fp32 (peft's kbit preparation). A mixture of experts' layers save
    what its router and its routed experts do (moe_saved) in place of a dense MLP's.

    Sequence parallelism (strategy.sequence_parallel N): a rank holds its T/N tokens of every activation (q, k,
    v and attention's output too: [T, heads/N] after the all-to-all is the same bytes), runs attention per
    sample (no T^2 mask), and in a layer's backward holds that layer's exchange buffers (exchange_bytes). Where
    the loss runs in chunks (chunked_loss) it holds one chunk of logits, not all. Offload checkpointing keeps
    one layer's input on the device, the others on the host (offloaded_activations)."""
    shape, notes = ModelShape.of(counts)
    h, layers, a, d, i, vocab = (
        shape.hidden,
        shape.layers,
        shape.heads,
        shape.head_dim,
        shape.intermediate,
        shape.vocab,
    )
    c = DTYPE_BYTES[s.compute_dtype]
    autocast = footprint(s.strategy).autocast and c != 4
    full, lora = s.finetune == "full", s.finetune != "full"
    residual = residual_bytes(s)
    linear_out = 4 if (c == 4 or (autocast and s.finetune == "qlora")) else c
    targets = set(LORA_TARGETS) if s.lora_targets == "all-linear" else set(s.lora_targets) & set(LORA_TARGETS)
    if lora and s.lora_targets != "all-linear" and not targets:
        notes.append("no target module has a Llama-style name: adapters' activations are not counted")
    dropout = lora and s.lora_dropout > 0
    if counts.num_experts and s.finetune == "qlora":
        notes.append("qlora: bitsandbytes quantises linear layers only; the experts' 3D weights stay unquantised "
                     "(fp32 after peft's k-bit preparation)")

    def saved_input(in_bytes: int, consumers: int) -> int:
        """Bytes per element its consumers (trainable linears or adapters) save of one input tensor."""
        if consumers == 0:
            return 0
        if dropout:
            return consumers * (c + 1)  # each adapter's own dropped copy plus its bool mask
        copy = in_bytes != c or (autocast and lora)  # autocast/peft cast per consumer, else one shared tensor
        return consumers * c if copy else in_bytes

    def consumers(*names: str) -> int:
        return len(names) if full else sum(n in targets for n in names)

    pairs = s.method in PAIR_METHODS
    tokens = rank_tokens(s)
    rows, seq = (1, tokens) if s.padding_free else (s.micro_batch_size, s.max_length)
    several = s.micro_batch_size > 1 or s.packing or pairs
    flash = s.attention == "flash_attention_2"
    # On the CPU, sdpa runs padding-free rows per sample, without a mask (training/kernels/attention.py's
    # collate_attention); so does sequence parallelism everywhere (its all-to-all hands sdpa whole samples of a
    # share of the heads), whose exchanged-back output is one more tensor, as the per-sample kernel's is
    sequence_parallel = s.sequence_parallel > 1
    per_sample = s.attention == "sdpa" and (sequence_parallel or s.device == "cpu" and s.padding_free and several)
    masked = not flash and not per_sample and (several if s.padding_free else True)
    # transformers expands k and v to every head when a mask is given (the per-sample kernel does too)
    repeat_kv = s.attention == "eager" or masked or per_sample
    kv_width = a * d if repeat_kv else shape.kv_heads * d

    norm = 4 * h + 4 + (residual * h if full else 0)  # fp32 input for the variance, rsqrt, normed pre-weight
    per_token = 2 * norm  # what every layer saves, of its norms and attention; then its MLP's (dense or MoE)
    per_token += h * saved_input(residual, consumers("q_proj", "k_proj", "v_proj"))
    per_token += c * (a * d + 2 * kv_width + a * d)  # q, k, v and the output saved by attention
    if shape.qk_norm:  # as `norm`, over each head of q and k: fp32 input, rsqrt, normed pre-weight
        qk = (a + shape.kv_heads) * d
        per_token += 4 * qk + 4 * (a + shape.kv_heads) + (linear_out * qk if full else 0)
    o_copy = consumers("o_proj") and (dropout or autocast and lora)
    # eager's output is a new tensor; so is the per-sample kernel's (the samples' outputs concatenated)
    per_token += c * a * d * (bool(o_copy) + (s.attention == "eager" or per_sample))
    per_token += 4 * a if s.attention != "eager" else 0  # log-sum-exp of flash / memory-efficient kernels
    per_token += lora * c * s.lora_r * len(targets - MLP_TARGETS)  # each lora_B keeps lora_A's output
    dense_mlp = h * saved_input(residual, consumers("gate_proj", "up_proj"))
    dense_mlp += 3 * linear_out * i  # gate, silu(gate), up
    dense_mlp += i * saved_input(linear_out, consumers("down_proj"))
    dense_mlp += lora * c * s.lora_r * len(targets & MLP_TARGETS)
    per_layer_square = 0
    if s.attention == "eager":  # fp32 softmax output, and its compute-dtype copy for probs @ v
        per_layer_square = rows * a * seq * seq * (4 + (c if c != 4 else 0))
    elif masked:
        per_layer_square = rows * seq * seq * c
    dense = (per_token + dense_mlp) * tokens + per_layer_square
    moe_layers = shape.moe_layers
    trained_experts = full or counts.adapted_experts
    router_input = saved_input(residual, int(trained_experts))
    moe_mlp, moe_weights, moe_transient = moe_saved(
        shape, s, residual, router_input, trained_experts, counts.fp32_routing
    )
    moe = (per_token + moe_mlp) * tokens + per_layer_square + moe_weights

    mask_once = 0
    if s.attention == "eager":
        # the loop casts the block mask to the compute dtype; transformers' own causal mask is the residual's
        mask_once = rows * seq * seq * (c if several else residual)
    elif masked:
        mask_once = rows * seq * seq
    final_norm = 4 * h + 4 + (residual * h + h * saved_input(residual, 1) if full else 0)
    misc = tokens * (final_norm + 2 * d * residual + 24) + mask_once  # rotary cos/sin, ids, labels, positions
    # The loss over the vocabulary (fp32 log-softmax output, its grad, the logits' grad), at every position
    # in the worst case (CausalLMLoss projects labelled positions only). Reward models score with one unit.
    # grpo takes logits at its label (completion) positions only, at most max_completion_length a row.
    labelled = s.micro_batch_size * s.completion_length if s.completion_length else tokens
    loss = 12 * labelled * (1 if s.method == "reward" else vocab)
    if chunked_loss(counts, s):
        loss = chunked_loss_bytes(counts, s, labelled, residual)
    # Backward through one layer: an intermediate's and a hidden state's grads in the MLP; in eager
    # attention the grads of the T^2 scores, by when the layer's MLP has freed what it saved.
    transient = (linear_out * i + c * h) * tokens
    if autocast and lora:  # peft casts an adapter's input up to fp32, then autocast casts it back down
        transient += 4 * i * tokens
    moe_transient = (moe_transient + c * h) * tokens + moe_weights // 3
    if sequence_parallel:  # one layer's exchange buffers at a time: about a copy of its q, k, v and output
        transient += exchange_bytes(shape, s)
        moe_transient += exchange_bytes(shape, s)
    if s.attention == "eager":
        after_attention = (
            norm + h * saved_input(residual, consumers("gate_proj", "up_proj")) + 3 * linear_out * i
        )
        square_grads = rows * a * seq * seq * (8 if c == 4 else 6)
        transient = max(transient, square_grads - after_attention * tokens)
        moe_transient = max(moe_transient, square_grads - (norm + moe_mlp) * tokens)
    # (layers of the kind, what one saves, its backward's temporaries): dense layers, then MoE layers
    kinds = [(layers - moe_layers, dense, transient, False), (moe_layers, moe, moe_transient, True)]
    kinds = [k for k in kinds if k[0]] or kinds[:1]
    if s.gradient_checkpointing != "none":  # each layer keeps its input, the rest is recomputed layer by layer
        # offload: the kept inputs wait in host memory (offloaded_activations), one layer's on the device: the
        # layer running forward, or recomputing
        kept = (1 if s.gradient_checkpointing == "offload" else layers) * residual * h * tokens
        kept += moe_layers * c * shape.experts * tokens  # the router's logits, kept for the auxiliary loss
        selective = {False: 0, True: 0}
        if s.gradient_checkpointing == "selective":  # and the outputs of its matmuls and attention
            for routed in (False, True):
                selective[routed] = selective_kept(shape, s, tokens, rows, seq, linear_out, targets, routed)
        every = sum(n * selective[routed] for n, _, _, routed in kinds)
        # in its backward, a layer's own kept outputs are among what its recompute saves (its `saved`)
        at_loss = kept + every + misc + loss
        in_layers = max(every - selective[routed] + saved + temporary for _, saved, temporary, routed in kinds)
        return (at_loss, kept + misc + in_layers), notes
    if lora:  # the first layer's input (frozen embeddings) needs no grad: its first norm saves nothing
        misc -= (4 * h + 4) * tokens
    every = sum(n * saved for n, saved, _, _ in kinds)
    return (every + misc + loss, every + misc + max(temporary for _, _, temporary, _ in kinds)), notes


def rank_tokens(s: Setting) -> int:
    """Tokens of one micro-batch on one rank, every sample at its longest: micro_batch x row length (pairs:
    two sequences a sample), of which a sequence-parallel rank holds its 1/sequence_parallel chunk."""
    row_length = s.max_length + s.completion_length  # grpo: prompt + completion, else completion_length 0
    tokens = s.micro_batch_size * row_length * (2 if s.method in PAIR_METHODS else 1)
    return ceil(tokens / max(1, s.sequence_parallel))


def residual_bytes(s: Setting) -> int:
    """Element bytes of the residual stream: fp32 under autocast over fp32 weights (but LoRA's frozen base in the
    compute dtype) and in fp32 runs, else the compute dtype."""
    c = DTYPE_BYTES[s.compute_dtype]
    autocast = footprint(s.strategy).autocast and c != 4
    return 4 if (c == 4 or (autocast and s.finetune != "lora")) else c


def offloaded_activations(counts: ParamCounts, s: Setting) -> int:
    """Host bytes of model.gradient_checkpointing: offload: every decoder layer's kept input (its residual
    stream over the rank's tokens), moved to the host in the forward until its recompute; 0 otherwise."""
    if s.gradient_checkpointing != "offload":
        return 0
    return counts.num_layers * residual_bytes(s) * counts.hidden_size * rank_tokens(s)


def chunked_loss(counts: ParamCounts, s: Setting) -> bool:
    """Whether the ranks compute the loss in chunks through the output projection, never holding the logits
    (training/kernels/fused_loss.py): installed by the kernels (Setting.kernels), not under a strategy that
    gathers weights in module hooks, for SFT and pretraining (the causal LM loss), on the families whose
    forward it reproduces; a frozen head (LoRA, QLoRA) and a trained one (full fine-tuning) alike."""
    return (s.kernels and counts.fusable_loss and s.method in CHUNKED_LOSS_METHODS
            and footprint(s.strategy).kernels_apply)


CHUNKED_LOSS_METHODS = frozenset({"sft", "pretrain"})  # training/methods/causal_lm.py's


def chunked_loss_bytes(counts: ParamCounts, s: Setting, labelled: int, residual: int) -> int:
    """The chunked loss at its peak over `labelled` positions: the hidden states' gradient it keeps for the
    backward ([labelled, hidden], the hidden states' dtype), and a chunk's logits (at most CHUNK_ELEMENTS): while
    the next chunk's are projected (compute dtype) and upcast (fp32), the last chunk's fp32 logits and their
    gradient (compute dtype) are still held (the loop's names free them when reassigned); measured on the CPU within 5%
    (tests/unit/test_planner_long_context.py). A trained head (full fine-tuning) also its weight's gradient,
    summed over the chunks in fp32."""
    from training.kernels.fused_loss import CHUNK_ELEMENTS

    c, vocab, h = DTYPE_BYTES[s.compute_dtype], counts.vocab_size, counts.hidden_size
    chunk = min(labelled, max(1, CHUNK_ELEMENTS // max(1, vocab))) * vocab
    # the last chunk's fp32 logits and its logits' gradient (compute dtype), this one's projection and upcast
    per_element = 4 + 2 * c + (4 if c != 4 else 0)
    head_grad = 4 * vocab * h if s.finetune == "full" else 0
    return residual * labelled * h + per_element * chunk + head_grad


def exchange_bytes(shape: ModelShape, s: Setting) -> int:
    """One layer's q, k, v and attention output on one rank, as the sequence-parallel all-to-all sends them
    (compute dtype): [rank's tokens, every head] before, [every token, heads / degree] after, the same bytes. Key
    and value heads that do not divide among the ranks are repeated to the query heads first."""
    n = s.sequence_parallel
    kv = shape.kv_heads if shape.kv_heads % n == 0 else shape.heads
    return DTYPE_BYTES[s.compute_dtype] * rank_tokens(s) * shape.head_dim * (2 * shape.heads + 2 * kv)


def all_to_all_bytes(counts: ParamCounts, s: Setting) -> int:
    """Bytes one rank sends in the sequence-parallel all-to-alls of an optimizer step: in every layer q, k, v out
    and the attention output back in the forward, their gradients in the backward, and with checkpointing the
    forward's four again in the recompute; (degree - 1) / degree of each leaves the rank. 0 without sequence
    parallelism."""
    n = s.sequence_parallel
    if n <= 1:
        return 0
    shape, _ = ModelShape.of(counts)
    passes = 2 + (s.gradient_checkpointing != "none")
    return shape.layers * passes * exchange_bytes(shape, s) * (n - 1) // n * s.grad_accum


def moe_saved(
    shape: ModelShape, s: Setting, residual: int, router_input: int, trained: bool, fp32_routing: bool
) -> tuple[int, int, int]:
    """(saved per token, saved per layer, backward temporaries per token) in bytes of one mixture-of-experts
    MLP as transformers runs it (its grouped_mm experts, integrations/moe.py). The router saves its input where
    its weight trains (`router_input` per element), its logits (the auxiliary loss keeps them), their fp32
    softmax, the top-k indices and weights. Each of the experts_per_token copies of a token saves the
    gate-up output, SiLU(gate), the down output (for the routing weight's gradient) and the sort's indices,
    and where the experts train (full, or LoRA's adapters on them) its gathered input and the down
    projection's input. The experts run in their weights' dtype (grouped_mm is no autocast op: fp32 under
    single/ddp full fine-tuning). LoRA's adapted experts build weight + B·A (PEFT's ParamWrapper) in every
    forward, which their matmuls keep for the backward: a copy of the layer's expert weights."""
    if not shape.moe_layers:
        return 0, 0, 0
    h, k, i, e = shape.hidden, shape.experts_per_token, shape.expert_intermediate, residual
    c = DTYPE_BYTES[s.compute_dtype]
    router = h * router_input + c * shape.experts + 4 * shape.experts + k * (8 + 4)
    routed = e * (3 * i + h) + trained * e * (h + i) + 3 * 8 + 4
    adapted = trained and s.finetune != "full"
    weights = e * shape.experts * (3 * i * h + h) if adapted else 0  # gate-up, down and the router's
    # Its backward's temporaries peak at the gate-up's: the grads of its output (2 x intermediate) and input
    # a copy, with the down projection's saved input and output freed (and, adapted, the down's weight + B·A,
    # for the gate-up's weight gradient: a third more). Routing weights in fp32 (Mixtral's) make the routed
    # outputs' product and its grads fp32.
    wider = 3 * h * (4 - e) if fp32_routing else 0
    return router + k * routed, weights, k * (e * (2 * i + h - (h + i * trained)) + wider)


def selective_kept(
    shape: ModelShape, s: Setting, tokens: int, rows: int, seq: int, linear_out: int, targets: set[str],
    routed: bool = False,
) -> int:
    """Bytes a decoder layer keeps beyond its input under selective checkpointing: the outputs of the ops
    strategies/activation_checkpointing.py keeps. The seven projections; attention's output and log-sum-exp
    (eager: its probabilities @ values, and the T^2 scores unless they are a low-rank product, T >= 8 x
    head_dim); each adapter's A (rank r), and its B where that is no low-rank product (PEFT's linear; the
    fused CPU one adds B into the base output, which keeps nothing more). A `routed` (MoE) layer keeps its
    router's logits in place of the MLP's three: its experts' grouped matmuls are recomputed."""
    h, a, d, kv, i = shape.hidden, shape.heads, shape.head_dim, shape.kv_heads, shape.intermediate
    c = DTYPE_BYTES[s.compute_dtype]
    width = {"q_proj": a * d, "k_proj": kv * d, "v_proj": kv * d, "o_proj": h, "gate_proj": i, "up_proj": i,
             "down_proj": h}  # fmt: skip
    if routed:
        width = {name: w for name, w in width.items() if name not in MLP_TARGETS}
        targets = targets - MLP_TARGETS
    per_token = linear_out * sum(width.values()) + c * a * d + (c * shape.experts if routed else 0)
    per_token += 4 * a if s.attention != "eager" else 0
    if s.finetune != "full":
        per_token += c * sum(s.lora_r + (width[t] if s.lora_r * LOW_RANK > width[t] else 0) for t in targets)
    square = rows * a * seq * seq * c if s.attention == "eager" and d * LOW_RANK > seq else 0
    return per_token * tokens + square


# -- grpo's rollout -------------------------------------------------------------------------------------
DECODE_LOGIT_COPIES = 3  # the last position's fp32 logits, and the sampler's processed scores and probabilities


def kv_cache_bytes(counts: ParamCounts, s: Setting) -> int:
    """The KV cache (transformers' DynamicCache, compute dtype) of one rank's generation batch, left-padded to
    the longest row: rows x (max_length + max_completion_length) positions x layers x K and V x kv heads x
    head_dim."""
    shape, _ = ModelShape.of(counts)
    positions = s.max_length + s.completion_length
    return s.generation_rows * positions * shape.layers * 2 * shape.kv_heads * shape.head_dim * DTYPE_BYTES[
        s.compute_dtype
    ]


def decode_logits_bytes(counts: ParamCounts, s: Setting) -> int:
    """A decode forward keeps the last position's logits only ([rows, vocab], fp32), and sampling a few copies."""
    return DECODE_LOGIT_COPIES * s.generation_rows * counts.vocab_size * 4


def reward_model_parameters(spec: JobSpec) -> list[int]:
    """Parameters of each reward model of a grpo job (`method.rewards[i].model`; 0 for a function), from
    its config on the meta device, with the one-unit head it scores with."""
    return [
        _sequence_classifier_parameters(r.model, spec.model.trust_remote_code, f"method.rewards.{i}.model")
        if r.model else 0
        for i, r in enumerate(getattr(spec.method, "rewards", ()))
    ]  # fmt: skip


@lru_cache(maxsize=32)
def _sequence_classifier_parameters(path: str, trust_remote_code: bool, field: str) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{field}: cannot read a model config from {path!r} ({first})",
            "give a local sequence-classification model directory holding config.json, or a hub id reachable "
            "from this machine",
        ) from None
    config.num_labels = 1
    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())  # tied parameters once


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
