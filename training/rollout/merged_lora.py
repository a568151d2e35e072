"""LoRA merged into its base for a rollout: each LoRA linear runs as one matmul with W + scale·B·A.

Generation runs tens of one-token forwards, where a LoRA linear costs three matmuls and PEFT's Python
around them (on the CPU bench each decode forward called 85 linears, 56 of them the adapters'). Merged,
it is one. The base weights are never touched (PEFT's merge_adapter would add and later subtract the
delta in place, which does not give the base back exactly in floating point): the merged weight is a
temporary copy per layer, in the base's dtype, dropped when the rollout ends. The planner counts those
copies in the generation peak and merges only where they fit (Plan.rollout["merge_lora"]).

The merged product rounds differently from the unmerged one; generation samples from it, and every
strategy generates the same way, so completions stay the same across ranks and strategies. The loss,
the old policy's and the reference's log-probabilities always run through the unmerged adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def mergeable_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT's plain LoRA linears (not 4-bit, not DoRA) with one active, unmerged adapter."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    found = []
    for module in model.modules():
        if type(module) is not LoraLinear or module.merged or len(module.active_adapters) != 1:
            continue
        name = module.active_adapters[0]
        if name in module.lora_A and not module.use_dora.get(name, False):
            found.append(module)
    return found


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Within: every mergeable LoRA linear of `model` computes x @ (W + ΔW)ᵀ + b; yields how many."""
    layers = mergeable_layers(model)
    saved = []
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(layer.active_adapters[0])
            weight = base.weight + delta.to(base.weight.dtype)
            saved.append(layer.__dict__.get("forward"))
            layer.forward = _merged_forward(weight, base.bias)
    try:
        yield len(layers)
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            del layer.forward
            if forward is not None:  # a kernel's own forward (training/kernels/lora_fused.py)
                layer.forward = forward


def _merged_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight, bias)

    return forward
