"""One way to run a job, evaluated: the Setting a strategy would run with, the memory one of its ranks would
hold (its footprint, strategies/footprint/, plus the activations of launcher/shapes.py), and the GPU bytes
it must fit in."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.shapes import (
    activation_phases,
    decode_logits_bytes,
    kv_cache_bytes,
    offloaded_activations,
    reward_model_parameters,
)
from launcher.spec import JobSpec
from strategies import footprint
from strategies.footprint.counts import DTYPE_BYTES, MemoryEstimate, ParamCounts, Setting, tensors_of

GIB = 1024**3
CUDA_RESERVED = GIB  # CUDA context, cuBLAS workspace and NCCL buffers: never available to tensors
FRAGMENTATION = 0.05  # the caching allocator's blocks never pack perfectly


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
    """What besides the model decides a rank's memory, for `spec` run as `strategy` + `offload`."""
    ft = spec.finetune
    method = spec.method
    grpo = method.kind == "grpo"
    return Setting(
        strategy=strategy,
        offload=offload,
        world_size=world,
        sequence_parallel=spec.strategy.sequence_parallel,
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
        method=method.kind,
        completion_length=method.max_completion_length if grpo else 0,
        generation_rows=mbs * accum if grpo else 0,  # global_batch_size / world: one generation batch
        frozen_copy=grpo and method.beta > 0 and ft.type == "full",  # LoRA's reference: the adapter off
        held_model_bytes=DTYPE_BYTES[compute] * sum(reward_model_parameters(spec)) if grpo else 0,
        kernels=True,
    )


def estimate(counts: ParamCounts, s: Setting) -> tuple[MemoryEstimate, list[str]]:
    """The memory of one rank under `s`, and notes worth showing the user."""
    strategy = footprint(s.strategy)
    state = strategy.state(counts, s)
    buffers, step_extra, notes = strategy.buffers(counts, s)
    (act_loss, act_layers), act_notes = activation_phases(counts, s)
    frozen = rollout_models(counts, s)
    held = state["params"] + state["grads"] + state["optimizer"] + frozen
    at_loss, in_layers = strategy.held_in_backward(counts, s, state["grads"], buffers)
    backward = state["params"] + state["optimizer"] + frozen + max(at_loss + act_loss, in_layers + act_layers)
    generation = 0
    if s.generation_rows:  # grpo: one batch decoded with a KV cache, between optimizer steps
        between = strategy.held_between_steps(counts, s, state["grads"], buffers)
        decoding = kv_cache_bytes(counts, s) + decode_logits_bytes(counts, s)
        generation = state["params"] + state["optimizer"] + frozen + between + decoding
    result = MemoryEstimate(
        params=state["params"],
        grads=state["grads"],
        optimizer=state["optimizer"],
        buffers=buffers,
        activations=max(act_loss, act_layers),
        offloaded=state["offloaded"] + offloaded_activations(counts, s),
        step=held + step_extra,
        backward=backward,
        frozen_models=frozen,
        generation=generation,
    )
    if generation and generation >= max(backward, held + step_extra):
        notes = [*notes, f"grpo: generation is the peak ({s.generation_rows} completions a rank, one KV cache)"]
    return result, notes + act_notes


def rollout_models(counts: ParamCounts, s: Setting) -> int:
    """grpo: bytes a rank holds of models besides the policy: the frozen reference and the reward models."""
    reference = footprint(s.strategy).frozen_copy_bytes(counts, s) if s.frozen_copy else 0
    return reference + s.held_model_bytes


def rollout(counts: ParamCounts, s: Setting) -> dict[str, int] | None:
    """grpo's rollout as `s` runs it, per rank (Plan.rollout); None for other methods."""
    if not s.generation_rows:
        return None
    return {
        "generation_batch": s.generation_rows,
        "row_length": s.max_length + s.completion_length,
        "kv_cache_bytes": kv_cache_bytes(counts, s),
        "decode_logits_bytes": decode_logits_bytes(counts, s),
        "reference_bytes": footprint(s.strategy).frozen_copy_bytes(counts, s) if s.frozen_copy else 0,
        "reward_model_bytes": s.held_model_bytes,
        "generation_peak_bytes": estimate(counts, s)[0].generation,
    }


def generation_gather(counts: ParamCounts, s: Setting, usable: int | None, generation_peak: int,
                      asked: str = "auto") -> dict:
    """How generation reaches the parameters, and whether LoRA is merged for it.

    gather: a strategy that shards parameters (fsdp, zero3: its frozen copy is smaller than the whole
    model) gathers them once for the whole rollout, every parameter whole on each rank in the compute dtype
    for its span (on the CPU bench 1.5-2.9x faster generation under fsdp, 10.8x under zero3,
    docs/BENCHMARKS.md), where that fits beside the generation peak; else one gather per forward, ranks
    decoding in lockstep (method.generation_gather chooses either). Strategies that hold whole parameters:
    nothing to gather ("none").
    merge_lora: LoRA (not QLoRA) generates with each adapted linear merged into a temporary copy of its
    weight (training/rollout/merged_lora.py; -25% generation on the CPU bench), where the copies fit too
    and the parameters are whole during generation."""
    whole = DTYPE_BYTES[s.compute_dtype] * sum(t.numel for t in tensors_of(counts))
    merged = 0
    if s.finetune == "lora":  # an upper bound: every frozen linear weight may be adapted
        merged = DTYPE_BYTES[s.compute_dtype] * sum(t.numel for t in tensors_of(counts) if t.matmul and not t.trainable)

    def fits(extra: int) -> bool:
        return usable is None or generation_peak + extra <= usable

    if footprint(s.strategy).frozen_copy_bytes(counts, s) >= whole:
        gather, gathered = "none", 0
    elif asked == "rollout" or (asked == "auto" and fits(whole)):
        gather, gathered = "rollout", whole
    else:
        gather, gathered = "forward", 0
    merge = bool(merged) and gather != "forward" and fits(gathered + merged)
    return {"gather": gather, "gathered_bytes": gathered, "merge_lora": merge, "merged_lora_bytes": merged if merge else 0}


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
    sequence_parallel: int = 1  # ranks each row is split over
    all_to_all_bytes: int = 0  # sent by one rank per optimizer step in sequence parallelism's all-to-alls

    @property
    def label(self) -> str:
        return candidate_label(self.strategy, self.offload)

    def to_dict(self) -> dict:
        out = {
            "strategy": self.strategy,
            "offload": self.offload,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "bytes_per_rank": self.memory.to_dict(),
            "fits": self.fits,
        }
        if self.sequence_parallel > 1:
            out.update(sequence_parallel=self.sequence_parallel, all_to_all_bytes_per_step=self.all_to_all_bytes)
        return out


def candidate_label(strategy: str, offload: str) -> str:
    """How a candidate is named to the user: `zero3 + offload params`."""
    return strategy if offload == "none" else f"{strategy} + offload {offload}"
