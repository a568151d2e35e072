"""The fused LoRA linear (training/kernels/lora_fused.py) against PEFT's own forward: outputs, every gradient, RNG."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support.kernel_inputs import ENGINES
from support.memory import saved_for_backward_bytes
from torch import nn

from strategies import create_strategy
from strategies.base import DistEnv, StrategyOptions
from training.kernels.cpu_gemm import engine_scope
from training.kernels.lora_fused import fuse_lora_linears


class Block(nn.Module):
    """Linears with and without bias, a 3-D input, and a non-contiguous one (a transposed view)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = self.down(h).transpose(0, 1)
        return self.head(h.transpose(0, 1))


def peft_pair(dropout: float, train_bias: bool = False):
    torch.manual_seed(0)
    base = Block()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down", "head"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # B is zero at init, so A's gradient would be too: give B values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    if train_bias:
        model.base_model.model.up.base_layer.bias.requires_grad_(True)
    fused = copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 3
    return model.train(), fused.train()


def run(model, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.fixture(params=ENGINES, ids=["aten", "onednn"])
def onednn(request):
    """The test runs with this process's CPU matmul engine set to aten, then to oneDNN (cpu_gemm.py)."""
    with engine_scope("onednn" if request.param else "aten"):
        yield request.param


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_bias", [False, True])
def test_fused_equals_peft_outputs_and_gradients(dropout, train_bias, onednn):
    """On oneDNN the 15 tokens are padded to a bucket of 32 inside (training/kernels/cpu_gemm.py)."""
    peft_model, fused = peft_pair(dropout, train_bias)
    x = torch.randn(3, 5, 24)
    for seed in (1, 2):  # twice: dropout draws a fresh mask, the same one in both
        peft_model.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
        out_a, gx_a, grads_a = run(peft_model, x, seed)
        out_b, gx_b, grads_b = run(fused, x, seed)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-6)
        assert grads_a.keys() == grads_b.keys()
        # 3 x (A, B), plus the base bias when it trains: frozen base weights get no gradient in either.
        assert len(grads_a) == 6 + train_bias
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_draws_the_same_dropout_masks_as_peft():
    peft_model, fused = peft_pair(0.5)
    x = torch.randn(2, 3, 24)
    torch.manual_seed(7)
    peft_model(x)
    after_peft = torch.rand(3)
    torch.manual_seed(7)
    fused(x)
    assert torch.equal(torch.rand(3), after_peft)


def test_fused_falls_back_where_it_does_not_apply():
    peft_model, fused = peft_pair(0.0)
    x = torch.randn(2, 3, 24)
    calls = []
    for module in fused.modules():
        if hasattr(module, "_peft_forward"):
            original = module._peft_forward
            module._peft_forward = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    fused(x)
    assert calls == []  # all three layers took the fused path
    with fused.disable_adapter():  # DPO's reference model: the base alone
        torch.testing.assert_close(fused(x), _base_only(peft_model, x))
    assert len(calls) == 3
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: PEFT's path, under autocast
        torch.testing.assert_close(fused(x), peft_model(x))
    assert len(calls) == 3
    calls.clear()
    fused.eval()  # eval: dropout off, still fused
    fused(x)
    assert calls == []


def _base_only(peft_model, x):
    with peft_model.disable_adapter():
        return peft_model(x)


def test_zero3_keeps_peft_forward_other_strategies_fuse():
    """ZeRO-3 gathers each weight in its own submodule's hook, which the fused path would skip."""
    options, env = StrategyOptions(), DistEnv()
    assert create_strategy("zero3", options, env).gathers_params_in_module_hooks
    for name in ("single", "ddp", "fsdp", "zero1", "zero2"):
        assert not create_strategy(name, options, env).gathers_params_in_module_hooks, name


def test_the_planner_models_the_kernels_where_the_runtime_runs_them():
    """The planner's footprint (kernels_apply) and the runtime's strategy (gathers_params_in_module_hooks)
    are two views of one fact; a strategy that changes one without the other plans the wrong memory."""
    from strategies import footprint
    options, env = StrategyOptions(), DistEnv()
    for name in ("single", "ddp", "fsdp", "zero1", "zero2", "zero3"):
        runtime = not create_strategy(name, options, env).gathers_params_in_module_hooks
        assert footprint(name).kernels_apply == runtime, name


def test_fused_keeps_no_more_for_backward_than_peft(onednn):
    """The fused linear keeps its input (a view its consumers share), a 1-byte dropout mask and A's
    output: no flattened, padded or dropped copies, which it makes again in backward. PEFT keeps a dropped
    copy and a mask per adapter; without dropout, the same tensors as the fused one. (64 tokens: a whole
    oneDNN bucket, so no padded rows in the outputs either.)"""
    tokens = 64
    x = torch.randn(tokens, 24)
    inputs = tokens * (24 + 40 + 24)  # input elements of the three adapted linears
    for dropout in (0.0, 0.3):
        peft, fused = peft_pair(dropout)
        got, want = saved_for_backward_bytes(fused, x), saved_for_backward_bytes(peft, x)
        assert got <= (want - 4 * inputs if dropout else want), (dropout, got, want)
    # 37 tokens: oneDNN pads them to 64 for its kernels, and only the matmul outputs that something keeps
    # (A's outputs; the `down` output its transposing consumer keeps) may carry those 27 rows
    peft, fused = peft_pair(0.0)
    x = torch.randn(37, 24)
    pad_rows = (64 - 37) * 4 * (3 * 4 + 24) if onednn else 0
    assert saved_for_backward_bytes(fused, x) <= saved_for_backward_bytes(peft, x) + pad_rows
