"""LoRA linear layers as one autograd node: the base matmul, the adapter and their backward in one function.

PEFT's `lora.Linear.forward` runs `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules:
three linear calls, a scale, an add and a dtype cast, each an autograd node, plus Python checks on every
call. On the CPU bench job that bookkeeping is ~5% of a step (docs/BENCHMARKS.md, levers). Here
the same math is one `torch.autograd.Function`: forward is two matmuls and an `addmm` that folds the
scale and the add, backward computes exactly the gradients PEFT's graph would (input, A and B; the base
weight's and bias's only if they require one) with the scale folded into the small rank-r products.

It replaces the forward of each PEFT `lora.Linear` in place and keeps PEFT's modules, parameters, state
dicts and `disable_adapter()` (DPO's reference model) untouched: any call it does not cover falls back
to PEFT's own forward. Covered: one active adapter, plain LoRA (no DoRA or other variant), a plain
`nn.Linear` base (not 4-bit), the input, base and adapter in one dtype, no autocast. So a CPU fp32 run
gets it, and a bf16 GPU run (bf16 base, fp32 adapters, autocast) keeps PEFT's path, which is what the
benchmarks measured there. Where the job's CPU matmul engine is oneDNN (training/kernels/cpu_gemm.py),
the fp32 CPU matmuls here go to it, the token dimension padded to a bucket once in forward and once in
backward.

For the backward it keeps the input as given (its other users hold it anyway), the dropout mask as
bytes and A's rank-r output; the padded, flattened and dropped copies are made again there. Keeping them
held one more copy of every adapted linear's input, and four more bytes an element with dropout
(measured on the bench job: 20.6 -> 17.5 MiB, and 27.9 -> 19.3 MiB with dropout 0.1).

Dropout draws the same mask PEFT's `nn.Dropout` would (`empty_like(x).bernoulli_(1 - p)`, the CPU
path of `at::dropout`), so runs, and resumes from RNG state, are the same with and without this.

Not for ZeRO-3 (DeepSpeed gathers a partitioned weight in the hook of the submodule that owns it, and
this bypasses the submodules' calls) nor under `model.compile` (dynamo fuses PEFT's graph itself).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from training.kernels.cpu_gemm import linear, pad_tokens, token_contraction

log = logging.getLogger(__name__)

# The library code copied here (training/kernels/__init__.py): PEFT's LoRA linear forward, whose math and
# fallbacks (disabled, merged, mixed batches, variants, dtype casts) _fused_forward and _LoraLinearFunction follow.
UPSTREAM = {
    "peft.tuners.lora.layer.Linear.forward": (
        "0a8b96d29dea80c2",
        "_fused_forward and _LoraLinearFunction in training/kernels/lora_fused.py: the same output "
        "(base + lora_B(lora_A(dropout(x))) * scaling) and the same calls left to PEFT's forward",
    ),
}


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float):
        in_shape = x.shape
        x2 = x.reshape(-1, in_shape[-1])
        tokens = x2.shape[0]
        xp = pad_tokens(x2)  # oneDNN's token dimension in buckets (training/kernels/cpu_gemm.py); else x2
        keep = None
        if dropout_p > 0:
            keep = torch.empty_like(x2).bernoulli_(1 - dropout_p)
            xdp = pad_tokens(x2 * _noise(keep, dropout_p))
            keep = keep.bool()  # what backward keeps of the mask: 1 byte an element, not 4
        else:
            xdp = xp
        xa = linear(xdp, lora_a)  # [tokens (padded), r]; padded rows are zero
        out = linear(xp, weight, bias)[:tokens]
        out.addmm_(xa[:tokens], lora_b.t(), alpha=scaling)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.in_shape = in_shape
        # Backward gets the input itself (its consumers share one copy), not the flattened, padded or
        # dropped copies, and makes those again where it needs them.
        ctx.save_for_backward(x, keep, xa, weight, lora_a, lora_b)
        return out.view(*in_shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, xa, weight, lora_a, lora_b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        needs_x, needs_w, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        tokens = g.shape[0]
        gp = pad_tokens(g)
        noise = None if keep is None else _noise(keep, ctx.dropout_p, x2.dtype)
        # [tokens, r]: the gradient reaching A's output, scaled (padded rows are zero)
        gb = linear(gp, lora_b.t()).mul_(ctx.scaling)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if needs_x:
            grad_x = linear(gp, weight.t())[:tokens]
            if noise is None:
                grad_x.addmm_(gb[:tokens], lora_a)
            else:
                grad_x.add_(gb[:tokens].mm(lora_a).mul_(noise))
            grad_x = grad_x.view(ctx.in_shape)
        if needs_w:
            grad_w = token_contraction(gp, pad_tokens(x2))
        if needs_bias:
            grad_bias = g.sum(0)
        if needs_a:
            xdp = x2 if noise is None else x2 * noise
            grad_a = gb[:tokens].t().mm(xdp)  # [r, in]: aten's mm is the faster one here, either CPU
        if needs_b:
            grad_b = token_contraction(gp, xa).mul_(ctx.scaling)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def _noise(keep: torch.Tensor, p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverted dropout's multiplier from its keep mask: 0 or 1/(1-p), the same floats in forward and backward."""
    return keep.to(dtype or keep.dtype).div_(1 - p)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`lora.Linear.forward`, as one autograd node where it can be; PEFT's own forward otherwise."""
    adapters = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    base = self.base_layer
    if name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear:
        return self._peft_forward(x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == a.dtype == b.dtype) or torch.is_autocast_enabled(x.device.type):
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return _LoraLinearFunction.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]), p)


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every PEFT `lora.Linear` in `model` the fused forward; returns how many it changed. Its fp32
    CPU matmuls run on this process's engine (training/kernels/cpu_gemm.py)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    if count:
        log.info("LoRA: %d linear layers run as one fused autograd node each where they can", count)
    elif not any(hasattr(module, "_peft_forward") for module in model.modules()):
        from training.kernels import model_class, skipped

        skipped("lora_fused", model_class(model), "it has no plain LoRA linear layers (full fine-tuning, QLoRA)")
    return count
