"""fp32 matmuls on the CPU through oneDNN where it beats the BLAS that torch calls, measured per machine.

torch's CPU `mm` goes to MKL's sgemm. On AMD processors MKL takes its AVX2 code path even where the
core has AVX-512: on the Zen 5 core these benchmarks ran on, `mm` reaches ~105 GFLOP/s at a fine-tune's
shapes and oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU
backend calls) ~220, on the same fp32 operands with the same fp32 accumulation (docs/BENCHMARKS.md).
On an Intel core both reach AVX-512, so nothing is gained there. Hence no fixed rule: `rates()` times
both at one shape, once per machine (cached beside the MFU peak), and `engine()` picks oneDNN only
where it is clearly faster. `SHARPEN_CPU_GEMM=aten|onednn` overrides the choice (benchmarks, tests).

What uses it: the fused LoRA linear (training/lora_fused.py) and, where oneDNN is chosen, every plain
fp32 `nn.Linear` (the output projection; all linears of a full fine-tune) through `_LinearFunction`,
whose backward computes the input and weight gradients with the same kernel. Only for the CPU, fp32, no
autocast; never under ZeRO-3 (it gathers weights in module hooks) nor torch.compile (the compiler
picks its own kernels) -- training/worker.py decides.
"""

from __future__ import annotations

import functools
import logging
import os
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV = "SHARPEN_CPU_GEMM"
MIN_GAIN = 1.1  # oneDNN must be this much faster than aten's mm to be used


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D fp32 tensors, by oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# oneDNN builds (JIT-compiles) a kernel per distinct shape, ~0.4 ms each on the bench machine, and keeps
# it in a cache. A padding-free batch has a new token count nearly every step, so the token dimension is
# padded with zero rows to a multiple of this: a few dozen shapes a run instead of one per step.
TOKEN_BUCKET = 32


def pad_tokens(t: torch.Tensor, onednn: bool) -> torch.Tensor:
    """`t` [tokens, k] with zero rows appended up to a multiple of TOKEN_BUCKET when `onednn`; else `t`."""
    rows = t.shape[0]
    padded = -(-rows // TOKEN_BUCKET) * TOKEN_BUCKET if onednn else rows
    if padded == rows:
        return t
    out = t.new_empty(padded, t.shape[1])
    out[:rows].copy_(t)
    out[rows:].zero_()
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, onednn: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D operands, by the chosen engine. Empty operands (a rank with no label
    positions) take aten's path, which defines them."""
    if onednn and x.numel() and weight.numel():
        return onednn_linear(x, weight, bias)
    return torch.addmm(bias, x, weight.t()) if bias is not None else x.mm(weight.t())


def token_contraction(a: torch.Tensor, b: torch.Tensor, onednn: bool) -> torch.Tensor:
    """a.T @ b for a [tokens, p] and b [tokens, q]: a weight gradient, summed over the tokens."""
    if onednn and a.numel() and b.numel():
        return onednn_linear(a.t(), b.t())
    return a.t().mm(b)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear and it agrees with mm on a small product (checked once)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 33, generator=generator), torch.randn(5, 33, generator=generator)
    try:
        return torch.allclose(onednn_linear(x, w), x.mm(w.t()), rtol=1e-4, atol=1e-5)
    except RuntimeError:
        return False


def rates(cache=None) -> dict[str, float]:
    """fp32 matmul FLOP/s of this CPU by each engine ({"aten": ..., "onednn": ...} where available),
    measured once per machine, thread count and torch version (training/flops.py keeps the cache)."""
    from training import flops

    cpu = torch.device("cpu")
    measured = {"aten": lambda: flops.measured_peak_flops(cpu, torch.float32)}
    if onednn_available():
        measured["onednn"] = lambda: flops.measured_peak_flops(cpu, torch.float32, matmul=onednn_linear)
    return {name: flops.cached_measure(f"fp32 gemm {name}", cpu, measure, cache) for name, measure in measured.items()}


def engine(device: torch.device, dtype: torch.dtype, cache=None) -> str:
    """"onednn" or "aten": the kernel for fp32 CPU linears of this run."""
    forced = os.environ.get(ENV, "auto").strip().lower()
    if device.type != "cpu" or dtype != torch.float32:
        return "aten"
    if forced in ("aten", "onednn"):
        if forced == "onednn" and not onednn_available():
            log.warning("%s=onednn, but this torch has no usable oneDNN linear: using aten", ENV)
            return "aten"
        return forced
    measured = rates(cache)
    if measured.get("onednn", 0.0) >= MIN_GAIN * measured["aten"]:
        return "onednn"
    return "aten"


class _LinearFunction(torch.autograd.Function):
    """F.linear with oneDNN in forward and backward: the same gradients, from the faster kernel. The
    tokens are padded (pad_tokens) in forward and again in backward: keeping the padded copy would hold
    one more copy of every linear's input for the backward (measured: +20% of the activations)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        in_shape = x.shape
        x2 = x.reshape(-1, in_shape[-1])
        out = linear(pad_tokens(x2, True), weight, True, bias)[: x2.shape[0]]
        ctx.in_shape = in_shape
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # the input itself, shared
        return out.view(*in_shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        xp = None if x is None else pad_tokens(x.reshape(-1, x.shape[-1]), True)
        needs_x, needs_w, needs_bias = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gp = pad_tokens(g, True)
        grad_x = grad_w = grad_bias = None
        if needs_x:
            grad_x = linear(gp, weight.t(), True)[: g.shape[0]].view(ctx.in_shape)
        if needs_w:
            grad_w = token_contraction(gp, xp, True)
        if needs_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias


def _onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` by oneDNN where the operands are all fp32 and no autocast is on."""
    w = self.weight
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.device.type != "cpu"
        or (self.bias is not None and self.bias.dtype != torch.float32)
        or torch.is_autocast_enabled("cpu")
    ):
        return self._aten_forward(x)
    return _LinearFunction.apply(x, w, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Give every plain `nn.Linear` of `model` the oneDNN forward; returns how many it changed. Only
    exact nn.Linear: subclasses (4-bit, 8-bit, PEFT's layers) keep their own forward."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and not hasattr(module, "_aten_forward"):
            module._aten_forward = module.forward
            module.forward = types.MethodType(_onednn_forward, module)
            count += 1
    return count
