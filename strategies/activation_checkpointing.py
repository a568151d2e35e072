"""Activation checkpointing of decoder layers: full (keep each layer's input), selective (keep its matmuls too),
or offload (full, the kept input in host memory).

Full checkpointing keeps a layer's input and recomputes the whole layer in the backward: about a third
more compute. Selective also keeps the outputs of the expensive ops, the matmuls and attention, and
recomputes only the cheap ones (norms, rotary, SiLU, products, casts, dropout): most of the memory saving
for a few percent of compute, as torchtitan's `selective` mode. It is torch's selective checkpointing
(`create_selective_checkpoint_contexts`), passed as `context_fn` in the keywords transformers hands to
`torch.utils.checkpoint.checkpoint`, so every caller of a layer's `_gradient_checkpointing_func` gets it:
transformers' layers, training/kernels/last_layer.py's pruned last layer, PEFT, FSDP2 and ZeRO-3 alike.

A matmul whose output is LOW_RANK or more times wider than its contraction is recomputed all the same:
LoRA's B (rank r up to the layer's width) costs r multiply-adds per element to redo, and keeping it
would keep a second copy of every adapted projection's output (measured: LoRA then kept about what no
checkpointing keeps).

The policy sees aten ops below autograd, so it also looks inside custom autograd Functions (the fused
LoRA linear, cpu_gemm's oneDNN linear): their matmuls are kept and the rest of their forward re-runs.
Recomputed dropout draws the same mask: non-reentrant checkpointing restores the RNG state first.

Offload is full checkpointing whose kept inputs wait in host memory (pinned, on CUDA) from the layer's
forward to its recompute: at long rows they are what full checkpointing still holds on the device, a
[tokens, hidden] tensor per layer (64k tokens of a 4096-wide model: 512 MiB a layer in bf16, 16 GiB over
32 layers). How: torch's non-reentrant checkpoint saves its inputs as saved tensors (torch 2.13:
`_CheckpointFrame.save_inputs`, `_make_saved_tensor`) before it enters its own saved-tensor hooks, so
saved-tensor hooks around the checkpoint call see exactly those inputs and nothing the layer saves inside
(the checkpoint's own hooks replace them there). `offload_checkpointed_inputs` wraps the function that
transformers gives each layer (`_gradient_checkpointing_func`) in such hooks, so every caller gets it, as
for selective: transformers' layers, the pruned last layer, under every strategy. Not checkpoint's
`context_fn`: it runs inside the checkpoint, under its hooks, and would see none of its inputs.
(transformers' own `activation_checkpointing_enable(offload=True)` does the same with torch's
`save_on_cpu`, but asks for pinned memory on a machine without an accelerator too, where torch refuses
it.) On a CPU the inputs already are in host memory: they are kept as they are.

One case needs care: an op that writes in place into a kept output (the fused LoRA linear adds the
adapter into the base matmul's output with `addmm_`). Re-run in the backward it would add twice, and
torch refuses a kept tensor that changed. So such a write is kept too: the recompute replays neither op,
and the kept tensor already holds the sum. torch's check is off for it; the policy checks instead that
no recomputed op read the kept output before the write (the recompute would read the sum).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from strategies.footprint.counts import LOW_RANK  # torch-free there: the planner counts the same rule

MODES = ("none", "selective", "full", "offload")

# Ops whose outputs selective checkpointing keeps (functional overloads only: an `.out` variant writes into
# a buffer the recompute makes anew). Matmuls as aten sees them (nn.Linear is mm/addmm, batched matmuls
# bmm/baddbmm) and oneDNN's linear (training/kernels/cpu_gemm.py), each with the operand whose last
# dimension is the contraction; then sdpa's kernels (the CPU one is what the per-sample attention of
# training/kernels/attention.py calls) and flash-attn's (model.attention flash_attention_2).
MATMULS = {"aten::mm": 0, "aten::bmm": 0, "mkldnn::_linear_pointwise": 0, "aten::addmm": 1, "aten::baddbmm": 1}
ATTENTION = frozenset({
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
})  # fmt: skip


def checkpoint_kwargs(mode: str) -> dict[str, Any]:
    """Keywords for `torch.utils.checkpoint.checkpoint` (transformers' gradient_checkpointing_kwargs).

    Non-reentrant, because the reentrant variant needs inputs that require grad (it breaks LoRA on frozen
    embeddings) and re-runs hooks that FSDP2 and ZeRO-3 use to gather parameters. Offload's are full's:
    its inputs go to the host by `offload_checkpointed_inputs`, around the checkpoint call."""
    if mode not in MODES[1:]:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES[1:])}")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    return kwargs


def offload_checkpointed_inputs(model: nn.Module) -> int:
    """Make every checkpointed layer of `model` (transformers already set its `_gradient_checkpointing_func`)
    keep its checkpoint's inputs in host memory until the recompute; idempotent. Returns how many modules'
    functions it wrapped."""
    wrapped: dict[int, Callable] = {}  # transformers gives every module the same function: one wrapper for it
    count = 0
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None and not getattr(function, "offloads_inputs", False):
            module._gradient_checkpointing_func = wrapped.setdefault(id(function), _offloading(function))
            count += 1
    return count


def _offloading(checkpoint_function: Callable) -> Callable:
    @functools.wraps(checkpoint_function)
    def checkpoint_offloaded(function, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(to_host, from_host):
            return checkpoint_function(function, *args, **kwargs)

    checkpoint_offloaded.offloads_inputs = True
    return checkpoint_offloaded


def to_host(tensor: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
    """A checkpoint's input as it waits for the recompute: copied to pinned host memory from an accelerator
    (the copy queued on the current stream, which the recompute's copy back follows), kept as it is on the
    CPU."""
    if tensor.device.type == "cpu":
        return None, tensor
    host = torch.empty_like(tensor, device="cpu", pin_memory=not tensor.is_sparse)
    host.copy_(tensor, non_blocking=True)
    return tensor.device, host


def from_host(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
    device, tensor = packed
    return tensor if device is None else tensor.to(device, non_blocking=True)


def selective_contexts() -> tuple[Any, Any]:
    """The forward and recompute contexts of one checkpointed call, with a policy of its own."""
    return create_selective_checkpoint_contexts(SelectivePolicy(), allow_cache_entry_mutation=True)


class SelectivePolicy:
    """Keep matmul and attention outputs, and in-place writes into them; recompute the rest (module docstring)."""

    def __init__(self) -> None:
        # storage address of each kept output -> the first recomputed op that read it, if any
        self.kept: dict[int, str | None] = {}

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        name = op.name()
        if name in ATTENTION or (name in MATMULS and not _low_rank(args[MATMULS[name]], ctx.op_output)):
            for address in _addresses(ctx.op_output):
                self.kept.setdefault(address, None)
            return CheckpointPolicy.MUST_SAVE
        written = [a for a in _addresses(_written(op, args, kwargs)) if a in self.kept]
        if written:
            reader = next((self.kept[a] for a in written if self.kept[a]), None)
            if reader:
                raise RuntimeError(
                    f"selective activation checkpointing: {op} writes in place into a kept matmul or attention "
                    f"output that {reader} read before; its recompute would read the changed values. "
                    "Use model.gradient_checkpointing: full"
                )
            return CheckpointPolicy.MUST_SAVE
        if not getattr(op, "is_view", False):
            for address in _addresses((args, kwargs)):
                if address in self.kept and self.kept[address] is None:
                    self.kept[address] = str(op)
        return CheckpointPolicy.PREFER_RECOMPUTE


def _low_rank(operand: torch.Tensor, output: torch.Tensor) -> bool:
    return operand.shape[-1] * LOW_RANK <= output.shape[-1]


def _addresses(tree: Any) -> list[int]:
    """Storage addresses of the non-empty tensors in `tree` (tensors, lists, tuples, dicts of them)."""
    if isinstance(tree, torch.Tensor):
        return [tree.untyped_storage().data_ptr()] if tree.numel() else []
    if isinstance(tree, (list, tuple)):
        return [a for item in tree for a in _addresses(item)]
    if isinstance(tree, dict):
        return _addresses(list(tree.values()))
    return []


def _written(op, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments `op` writes into (self of `addmm_`, `out=` of an out variant)."""
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in _write_arguments(op)]


@functools.cache
def _write_arguments(op) -> tuple[tuple[int, str], ...]:
    schema = getattr(op, "_schema", None)  # higher-order ops (compiled regions) have none
    arguments = schema.arguments if schema is not None else []
    return tuple((i, a.name) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
