"""training.kernels.apply, the one entry point: which kernels a rank's model gets under which strategy, and
the loss and gradients of the plain model with all of them installed at once, on either CPU matmul engine."""

from __future__ import annotations

import copy

import pytest
import torch
from support.kernel_inputs import ENGINES, LENGTHS, completion_rows, lora_llama, loss_and_grads, tiny_llama

from strategies import create_strategy
from strategies.base import DistEnv, StrategyOptions
from training.data.packing import collate
from training.kernels import apply
from training.kernels.attention import PER_SAMPLE_SDPA
from training.kernels.cpu_gemm import engine_scope


def strategy(name: str):
    return create_strategy(name, StrategyOptions(), DistEnv())


def patched(model: torch.nn.Module) -> set[str]:
    """Names of the modules whose forward a kernel replaced (an instance attribute shadows the class's)."""
    return {name for name, module in model.named_modules() if "forward" in vars(module)}


@pytest.mark.parametrize("onednn", ENGINES, ids=["aten", "onednn"])
def test_every_kernel_at_once_keeps_the_plain_loss_and_gradients(onednn):
    """LoRA SFT on one CPU rank: the fused loss, the fused LoRA linears, the pruned last layer and, on
    oneDNN, the plain linears' oneDNN forward, together. No dropout: the pruned layer draws masks for its
    label positions only (the fused linear alone draws PEFT's masks, tests/unit/test_lora_fused.py)."""
    plain = lora_llama()
    fast = copy.deepcopy(plain)
    with engine_scope("onednn" if onednn else "aten"):
        applied = apply(fast, strategy("single"), compiled=False)
        assert applied == ["fused_loss", "lora_fused", "last_layer"] + (["onednn_linears"] if onednn else [])
        batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
        loss_a, grads_a = loss_and_grads(plain, batch)
        loss_b, grads_b = loss_and_grads(fast, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert sorted(grads_b) == sorted(grads_a) and len(grads_a) == 2 * 7 * 2  # A and B of 7 linears, 2 layers
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=atol, msg=name)


def test_the_strategy_and_compile_decide_which_kernels_apply():
    """ZeRO-3 gathers weights in module hooks: no kernel. Compiled layers: the fused loss only. A full
    fine-tune trains its head and has no LoRA linears: the pruned last layer only (on aten)."""
    model = lora_llama()
    assert apply(model, strategy("zero3"), compiled=False) == [] and patched(model) == set()
    assert apply(model, strategy("fsdp"), compiled=True) == ["fused_loss"]
    assert patched(model) == {"base_model.model"}  # the causal LM's forward, nothing inside it
    full = tiny_llama(layers=2)
    with engine_scope("aten"):
        assert apply(full, strategy("ddp"), compiled=False) == ["last_layer"]
