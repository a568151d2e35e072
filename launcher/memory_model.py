"""What one rank holds under each strategy, in bytes: parameters, gradients, optimizer state, the strategy's
working buffers and activations. Pure arithmetic over launcher.memory's tensor list (no torch, no deepspeed).

The byte model follows the strategies as implemented in strategies/ (torch 2.13, DeepSpeed 0.19,
transformers 5.24, peft 0.21); tests/test_planner.py checks params, grads and optimizer against
`Strategy.local_state_bytes()` on real ranks, and the activation model against the tensors autograd saves.

- single/ddp: fp32 trainable params and grads, AdamW moments; bf16 compute is autocast, which keeps a bf16
  copy of each trainable weight it multiplies for the backward (a buffer). DDP's grads are its buckets.
- fsdp (FSDP2): fp32 trainable shards (dim-0 rows, rank 0 holds the largest), grads and moments sharded;
  buffers: the root group (embeddings, head) gathered for the whole step, two decoder layers gathered,
  one layer's unsharded grads for the reduce-scatter, and with accumulation every unsharded fp32 grad.
- zero1/2/3 (DeepSpeed): module params in the compute dtype, fp32 masters + moments in the optimizer on
  partitions (ZeRO-1/2: one flat group padded to 2 x ranks; ZeRO-3: each tensor ceil(n/ranks), tensors
  of at most 10 x hidden elements also kept whole); ZeRO-1 holds full grads until the accumulation
  boundary, ZeRO-2/3 their partitions; buffers: reduce bucket (hidden^2), ZeRO-3's gathered modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from launcher.shapes import DTYPE_BYTES, ParamCounts, Setting, TensorInfo, activation_phases, nf4_bytes
from launcher.spec import JobSpec

DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements, when the hidden size is unknown
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's default sub_group_size: one AdamW step counter each


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
    # accumulation, and FSDP2 has every group resharded (see estimate()).
    backward: int

    @property
    def total(self) -> int:
        """The device peak: the larger of the forward/backward peak and the optimizer step's."""
        return max(self.backward, self.step)

    def to_dict(self) -> dict[str, int]:
        keys = ("params", "grads", "optimizer", "buffers", "activations", "offloaded")
        return {**{k: int(getattr(self, k)) for k in keys}, "total": int(self.total)}


# -- parameters, gradients, optimizer state ------------------------------------------------------------
def fsdp_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank` (torch.chunk: ceil-sized chunks, the last ones short or empty)."""
    chunk = ceil(dim0 / world)
    return max(0, min(dim0, (rank + 1) * chunk) - rank * chunk)


def _frozen_bytes(t: TensorInfo, c: int, s: Setting, cast_to_compute: bool) -> int:
    if t.storage == "nf4":
        return nf4_bytes(t.numel, s.double_quant, s.quant_storage_bytes)
    if t.storage == "fp32" and not cast_to_compute:
        return 4 * t.numel
    return c * t.numel


def packed_bytes(t: TensorInfo, s: Setting) -> int:
    """The packed nibbles of a 4-bit weight, without its block scales."""
    return s.quant_storage_bytes * ceil(t.numel / (2 * s.quant_storage_bytes))


def state_bytes(counts: ParamCounts, s: Setting) -> dict[str, int]:
    """params, grads, optimizer (device) and offloaded (host) bytes of one rank, as
    `Strategy.local_state_bytes()` reports them: params and grads at their most within a step,
    optimizer state after a step (AdamW: two fp32 moments and a 4-byte step counter per tensor)."""
    tensors = counts.tensors or _aggregate_tensors(counts)
    c = DTYPE_BYTES[s.compute_dtype]
    world, rank = max(1, s.world_size), s.rank
    trainable = [t for t in tensors if t.trainable]
    frozen = [t for t in tensors if not t.trainable]
    n_train = sum(t.numel for t in trainable)
    out = {"params": 0, "grads": 0, "optimizer": 0, "offloaded": 0}
    if s.strategy in ("single", "ddp"):
        out["params"] = 4 * n_train + sum(_frozen_bytes(t, c, s, False) for t in frozen)
        out["grads"] = 4 * n_train
        out["optimizer"] = 8 * n_train + 4 * len(trainable)
    elif s.strategy == "fsdp":

        def shard(t: TensorInfo) -> int:
            return fsdp_rows(t.dim0, world, rank) * (t.numel // max(1, t.dim0))

        local = sum(shard(t) for t in trainable)
        frozen_bytes = 0
        for t in frozen:
            full = _frozen_bytes(t, c, s, False)
            if t.storage == "nf4":  # the packed weight is sharded, its block scales are not
                packed = packed_bytes(t, s)
                frozen_bytes += full - packed + ceil(packed / world)
            else:
                frozen_bytes += full // t.numel * shard(t)
        out["params"] = 4 * local + frozen_bytes
        out["grads"] = 4 * local
        out["optimizer"] = 8 * local + 4 * len(trainable)
        if s.offload != "none":  # CPUOffloadPolicy: params, grads and AdamW all live on the host
            out["offloaded"] = out["params"] + out["grads"] + out["optimizer"]
            out["params"] = out["grads"] = out["optimizer"] = 0
    elif s.strategy in ("zero1", "zero2"):
        partition = ceil(n_train / (2 * world)) * 2  # flat group padded to 2 x ranks elements
        out["params"] = c * n_train + sum(_frozen_bytes(t, c, s, True) for t in frozen)
        out["grads"] = c * n_train if s.strategy == "zero1" else c * partition
        optimizer = 12 * partition + 4
        if s.offload != "none":  # fp32 grads (pinned) and a compute-dtype staging copy live on the host too
            out["offloaded"] = optimizer + 4 * partition + c * partition
            out["grads"] = c * n_train if s.strategy == "zero1" else 0
        else:
            out["optimizer"] = optimizer
    elif s.strategy == "zero3":
        threshold = 10 * counts.hidden_size if counts.hidden_size else 100_000
        params = 0
        for t in tensors:  # the module is cast to the compute dtype; 4-bit weights keep their bytes
            full = (
                nf4_bytes(t.numel, s.double_quant, s.quant_storage_bytes)
                if t.storage == "nf4"
                else c * t.numel
            )
            params += full * ceil(t.numel / world) // t.numel
            if t.numel <= threshold:
                params += full  # persistent: also kept gathered on every rank
        local = sum(ceil(t.numel / world) for t in trainable)
        optimizer = 12 * local + 4 * max(1, ceil(local / ZERO3_SUB_GROUP))
        out["params"], out["grads"], out["optimizer"] = params, c * local, optimizer
        if s.offload != "none":
            out["offloaded"] = optimizer + c * local
            out["grads"] = out["optimizer"] = 0
        if s.offload == "params":
            persistent = sum(c * t.numel for t in tensors if t.numel <= threshold)
            out["offloaded"] += params - persistent
            out["params"] = persistent
    else:
        raise ValueError(f"no memory model for strategy {s.strategy!r}")
    return out


def _aggregate_tensors(counts: ParamCounts) -> tuple[TensorInfo, ...]:
    """Shape-only counts (no tensor list): one trainable, one frozen plain and one 4-bit block, each a
    single row-sharded tensor. Exact up to per-tensor padding."""
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


# -- the strategies' working buffers -------------------------------------------------------------------
def buffer_bytes(counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
    """(forward/backward buffers, optimizer-step temporaries, notes) on the device of one rank."""
    tensors = counts.tensors or _aggregate_tensors(counts)
    c = DTYPE_BYTES[s.compute_dtype]
    world = max(1, s.world_size)
    trainable = [t for t in tensors if t.trainable]
    n_train = sum(t.numel for t in trainable)
    largest = max((t.numel for t in tensors), default=0)
    largest_trainable = max((t.numel for t in trainable), default=0)
    largest_nf4 = max((t.numel for t in tensors if t.storage == "nf4"), default=0)
    bucket = c * (counts.hidden_size**2 if counts.hidden_size else DEEPSPEED_DEFAULT_BUCKET)
    notes: list[str] = []
    dequant = c * largest_nf4  # bitsandbytes dequantises one 4-bit weight at a time for its matmul
    if s.strategy in ("single", "ddp"):
        # autocast keeps a compute-dtype copy of every fp32 weight it multiplies, for the backward
        autocast = sum(c * t.numel for t in tensors if t.matmul and t.storage in ("trainable", "fp32"))
        autocast = autocast if c != 4 else 0
        # torch AdamW on a GPU runs foreach: one fp32 temporary (sqrt of the variances) for every element
        adam = 4 * (n_train if s.device == "cuda" else largest_trainable)
        return autocast + dequant, adam, notes
    if s.strategy == "fsdp":
        layers = max(1, counts.num_layers)

        def gathered(t: TensorInfo) -> int:
            return packed_bytes(t, s) if t.storage == "nf4" else c * t.numel

        root = sum(gathered(t) for t in tensors if not t.in_layer)
        layer = sum(gathered(t) for t in tensors if t.in_layer) // layers
        layer_grads = sum(t.numel for t in trainable if t.in_layer) // layers
        live = layers if not s.reshard_after_forward else min(2, layers)
        buffers = root + live * layer + layer_grads * (c + (4 if c != 4 else 0)) + dequant
        if s.grad_accum > 1:
            buffers += 4 * n_train
            notes.append(
                "fsdp keeps every unsharded fp32 gradient between micro-steps (gradient accumulation)"
            )
        local = sum(fsdp_rows(t.dim0, world, s.rank) * (t.numel // max(1, t.dim0)) for t in trainable)
        return buffers, (4 * local if s.offload == "none" else 0), notes
    if s.strategy in ("zero1", "zero2"):
        partition = ceil(n_train / (2 * world)) * 2
        buffers = bucket + (c * largest_trainable if s.strategy == "zero2" else 0) + dequant
        return buffers, (8 * partition if s.offload == "none" else 0), notes
    local = sum(ceil(t.numel / world) for t in trainable)
    prefetch = int(0.9 * bucket)
    buffers = bucket + prefetch + c * largest + c * largest_trainable + dequant
    step = (4 * local if c != 4 else 0) + 4 * min(local, ZERO3_SUB_GROUP)
    return buffers, (step if s.offload == "none" else 0), notes


def held_in_backward(counts: ParamCounts, s: Setting, grads: int, buffers: int) -> tuple[int, int]:
    """(at the loss, in the layers' backward): gradient and buffer bytes the strategy holds at the two
    moments activation_phases describes; `grads` and `buffers` are their most within a step.

    single: gradients are set to None after each step and made by the backward, the output head's first
    (then each layer's as its activations are freed), so without accumulation none exist at the loss and
    only the layers' (non-layer) tensors' ones when the layers' backward starts. With accumulation the
    earlier micro-steps' are all there. ddp: gradients are views of the all-reduce buckets, which DDP
    allocates once. fsdp (FSDP2): the root group reshards after the forward like every other, and is
    gathered again by the first gradient reaching the head, after the loss's backward: at the loss only
    the accumulated unsharded gradients of earlier micro-steps are held; sharded gradients come from the
    reduce-scatters, the root's last. DeepSpeed: every column at both moments.
    (H200, bench/memory_check.py: single full x1.15 and fsdp full x1.11/x1.19 over, with these counted.)"""
    tensors = counts.tensors or _aggregate_tensors(counts)
    if s.strategy == "single":
        if s.grad_accum > 1:
            return grads + buffers, grads + buffers
        outside = 4 * sum(t.numel for t in tensors if t.trainable and not t.in_layer)
        return buffers, min(grads, outside) + buffers
    if s.strategy == "fsdp":
        n_train = sum(t.numel for t in tensors if t.trainable)
        accumulated = 4 * n_train if s.grad_accum > 1 else 0
        return accumulated, buffers
    return grads + buffers, grads + buffers


def estimate(counts: ParamCounts, s: Setting) -> tuple[MemoryEstimate, list[str]]:
    """The memory of one rank under `s`, and notes worth showing the user."""
    state = state_bytes(counts, s)
    buffers, step_extra, notes = buffer_bytes(counts, s)
    (act_loss, act_layers), act_notes = activation_phases(counts, s)
    activations = max(act_loss, act_layers)
    held = state["params"] + state["grads"] + state["optimizer"]
    at_loss, in_layers = held_in_backward(counts, s, state["grads"], buffers)
    backward = state["params"] + state["optimizer"] + max(at_loss + act_loss, in_layers + act_layers)
    result = MemoryEstimate(
        params=state["params"],
        grads=state["grads"],
        optimizer=state["optimizer"],
        buffers=buffers,
        activations=activations,
        offloaded=state["offloaded"],
        step=held + step_extra,
        backward=backward,
    )
    return result, notes + act_notes


# -- candidates: one strategy and offload, at the micro batch the plan would run --------------------
GIB = 1024**3
CUDA_RESERVED = GIB  # CUDA context, cuBLAS workspace and NCCL buffers: never available to tensors
FRAGMENTATION = 0.05  # the caching allocator's blocks never pack perfectly
# Fastest first: least communication, then sharding, then offloading to the host.
CANDIDATES = (
    ("ddp", "none"),
    ("zero1", "none"),
    ("zero2", "none"),
    ("fsdp", "none"),
    ("zero3", "none"),
    ("zero2", "optimizer"),
    ("zero3", "optimizer"),
    ("fsdp", "params"),
    ("zero3", "params"),
)
ONE_RANK_CANDIDATES = (("single", "none"), ("zero2", "optimizer"), ("fsdp", "params"), ("zero3", "params"))


def usable_bytes(capacity: int) -> int:
    """Of a GPU's memory, what tensors can use: less the allocator's slack and the CUDA context."""
    return int(capacity * (1 - FRAGMENTATION)) - CUDA_RESERVED


def gpu_capacity(spec: JobSpec, device: str) -> tuple[int | None, str]:
    """(bytes of one GPU, where the number comes from); None when unknown.

    resources.gpu_memory_gb (GiB, as vendors count: an "80 GB" H100 is 80 GiB) wins; a local CUDA job
    otherwise uses this machine's first GPU. A SLURM job's GPUs are not this machine's."""
    if spec.resources.gpu_memory_gb:
        return int(
            spec.resources.gpu_memory_gb * GIB
        ), f"resources.gpu_memory_gb: {spec.resources.gpu_memory_gb:g}"
    if device == "cuda" and spec.cluster.kind == "local":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"detected {props.name}"
    return None, "no GPU here and no resources.gpu_memory_gb"


def setting_for(
    spec: JobSpec, strategy: str, offload: str, world: int, device: str, compute: str, mbs: int, accum: int
) -> Setting:
    ft = spec.finetune
    return Setting(
        strategy=strategy,
        offload=offload,
        world_size=world,
        compute_dtype=compute,
        finetune=ft.type,
        micro_batch_size=mbs,
        grad_accum=accum,
        max_length=spec.data.max_length,
        attention=spec.model.attention,
        gradient_checkpointing=spec.model.gradient_checkpointing,
        padding_free=spec.data.padding_free,
        packing=spec.data.packing,
        reshard_after_forward=spec.strategy.reshard_after_forward,
        lora_r=ft.r,
        lora_dropout=ft.dropout,
        lora_targets=ft.target_modules if ft.target_modules == "all-linear" else tuple(ft.target_modules),
        double_quant=ft.double_quant,
        quant_storage_bytes={"auto": DTYPE_BYTES[compute], "uint8": 1, **DTYPE_BYTES}[ft.quant_storage],
        device=device,
        method=spec.method.kind,
    )


@dataclass(frozen=True)
class Candidate:
    """One way to run the job, evaluated: the micro batch it would use and what each rank would hold."""

    strategy: str
    offload: str
    micro_batch_size: int
    grad_accum: int
    memory: MemoryEstimate
    fits: bool
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.strategy if self.offload == "none" else f"{self.strategy} + offload {self.offload}"

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "offload": self.offload,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "bytes_per_rank": self.memory.to_dict(),
            "fits": self.fits,
        }
