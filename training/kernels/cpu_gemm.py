"""fp32 matmuls on the CPU through oneDNN where it beats the BLAS that torch calls: the process's engine.

torch's CPU `mm` goes to MKL's sgemm. On AMD processors MKL takes its AVX2 code path even where the
core has AVX-512: on the Zen 5 core these benchmarks ran on, `mm` reaches ~105 GFLOP/s at a fine-tune's
shapes and oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU
backend calls) ~220, on the same fp32 operands with the same fp32 accumulation (docs/BENCHMARKS.md).
On an Intel core both reach AVX-512, so nothing is gained there. Hence no fixed rule: the job key
`model.cpu_matmul` (auto | aten | onednn) is resolved once per job (training/kernels/__init__.py: `auto`
times both engines, training/flops.py, and takes oneDNN only where `faster_engine` says it is clearly
faster) and every rank sets the same engine here, once, with `set_engine` before its first forward.

What reads it: `linear`, `token_contraction` and `pad_tokens`, which the fused LoRA linear
(lora_fused.py) and the fused loss (fused_loss.py) call, take oneDNN for fp32 CPU operands when the
engine is "onednn" and aten otherwise; where oneDNN is chosen, every plain fp32 `nn.Linear` (the output
projection; all linears of a full fine-tune) also runs on it through `_LinearFunction`, whose backward
computes the input and weight gradients with the same kernel. Only for the CPU, fp32, no autocast;
never under ZeRO-3 (it gathers weights in module hooks) nor torch.compile (the compiler picks its own
kernels): `training.kernels.apply` decides.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
from torch import nn

ENGINES = ("aten", "onednn")
MIN_GAIN = 1.1  # oneDNN must be this much faster than aten's mm to be used

# This process's engine for fp32 CPU matmuls, set once per rank (set_engine) from the job's one choice.
_onednn = False


def set_engine(name: str) -> None:
    """Make `name` ("aten" or "onednn") this process's engine for fp32 CPU matmuls."""
    global _onednn
    if name not in ENGINES:
        raise ValueError(f"unknown CPU matmul engine {name!r}: one of {ENGINES}")
    _onednn = name == "onednn"


def current_engine() -> str:
    """This process's engine for fp32 CPU matmuls: "aten" until set_engine says otherwise."""
    return "onednn" if _onednn else "aten"


@contextlib.contextmanager
def engine_scope(name: str) -> Iterator[None]:
    """`name` as the engine inside the block, the previous one after (tests and benchmarks)."""
    previous = current_engine()
    set_engine(name)
    try:
        yield
    finally:
        set_engine(previous)


def faster_engine(rates: dict[str, float]) -> str:
    """"onednn" where its measured FLOP/s beat aten's by MIN_GAIN, else "aten"."""
    return "onednn" if rates.get("onednn", 0.0) >= MIN_GAIN * rates["aten"] else "aten"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D fp32 tensors, by oneDNN; any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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


def _on_onednn(t: torch.Tensor) -> bool:
    """Whether a matmul with operand `t` runs on oneDNN: the engine is oneDNN and `t` is fp32 on the CPU."""
    return _onednn and t.dtype == torch.float32 and t.is_cpu


# oneDNN builds (JIT-compiles) a kernel per distinct shape, ~0.4 ms each on the bench machine, and keeps
# it in a cache. A padding-free batch has a new token count nearly every step, so the token dimension is
# padded with zero rows to a multiple of this: a few dozen shapes a run instead of one per step.
TOKEN_BUCKET = 32


def _bucketed(t: torch.Tensor) -> torch.Tensor:
    """`t` [tokens, k] with zero rows appended up to a multiple of TOKEN_BUCKET (`t` itself if it is one)."""
    rows = t.shape[0]
    padded = -(-rows // TOKEN_BUCKET) * TOKEN_BUCKET
    if padded == rows:
        return t
    out = t.new_empty(padded, t.shape[1])
    out[:rows].copy_(t)
    out[rows:].zero_()
    return out


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """`t` [tokens, k] padded with zero rows to the bucket where its matmuls run on oneDNN; else `t`."""
    return _bucketed(t) if _on_onednn(t) else t


def _mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    # Empty operands (a rank with no label positions) take aten's path, which defines them.
    if onednn and x.numel() and weight.numel():
        return onednn_linear(x, weight, bias)
    return torch.addmm(bias, x, weight.t()) if bias is not None else x.mm(weight.t())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for 2-D operands, by this process's engine."""
    return _mm(x, weight, bias, _on_onednn(x))


def _contract(a: torch.Tensor, b: torch.Tensor, onednn: bool) -> torch.Tensor:
    if onednn and a.numel() and b.numel():
        return onednn_linear(a.t(), b.t())
    return a.t().mm(b)


def token_contraction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b for a [tokens, p] and b [tokens, q]: a weight gradient, summed over the tokens."""
    return _contract(a, b, _on_onednn(a))


class _LinearFunction(torch.autograd.Function):
    """F.linear with oneDNN in forward and backward: the same gradients, from the faster kernel. The
    tokens are padded (to the bucket) in forward and again in backward: keeping the padded copy would
    hold one more copy of every linear's input for the backward (measured: +20% of the activations)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        in_shape = x.shape
        x2 = x.reshape(-1, in_shape[-1])
        out = _mm(_bucketed(x2), weight, bias, True)[: x2.shape[0]]
        ctx.in_shape = in_shape
        ctx.save_for_backward(x if weight.requires_grad else None, weight)  # the input itself, shared
        return out.view(*in_shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_bias = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gp = _bucketed(g)
        grad_x = grad_w = grad_bias = None
        if needs_x:
            grad_x = _mm(gp, weight.t(), None, True)[: g.shape[0]].view(ctx.in_shape)
        if needs_w:
            grad_w = _contract(gp, _bucketed(x.reshape(-1, x.shape[-1])), True)
        if needs_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias


def _onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` by oneDNN where the operands are all fp32 and no autocast is on. A no-grad
    forward of fewer rows than a bucket (a decode step of generation: one token a row) stays on aten:
    padding it to the bucket would double its matmuls for nothing (oneDNN is no faster at 16 rows), and
    GRPO's LoRA decode ran 2x slower on the CPU bench that way."""
    w = self.weight
    if (
        (not torch.is_grad_enabled() and x.numel() < TOKEN_BUCKET * x.shape[-1])
        or x.dtype != torch.float32
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
