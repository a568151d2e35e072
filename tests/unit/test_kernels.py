"""training.kernels.apply, the one entry point: which kernels a rank's model of each family gets under which
strategy, the loss and gradients of the plain model with all of them installed at once, on either CPU matmul
engine, and the one rank-log line saying why for each kernel a family does not get."""

from __future__ import annotations

import copy

import pytest
import torch
from support.kernel_inputs import (
    ENGINES,
    LENGTHS,
    completion_rows,
    lora_family,
    lora_llama,
    loss_and_grads,
    tiny_llama,
)

from strategies import create_strategy
from strategies.base import DistEnv, StrategyOptions
from training.data.packing import collate
from training.kernels import apply
from training.kernels.attention import PER_SAMPLE_SDPA
from training.kernels.cpu_gemm import engine_scope
from training.tiny import FAMILIES

LLAMA_LAYER = ["fused_loss", "lora_fused", "last_layer"]
# family -> (the kernels a LoRA SFT model of it gets on one CPU rank, {kernel it does not get: the reason logged})
EXPECTED = {
    **{family: (LLAMA_LAYER, {}) for family in ("llama", "mistral", "qwen2", "qwen3")},
    "phi3": (["fused_loss", "lora_fused"], {"last_layer": "Phi3DecoderLayer: its forward is not Llama's (dropout"}),
    "gemma3": (["fused_loss", "lora_fused"], {"last_layer": "Gemma3DecoderLayer: its forward is not Llama's (sandwich"}),
    **{
        family: (["lora_fused"], {
            "fused_loss": f"{model}ForCausalLM: its forward adds the router's load-balancing loss",
            "last_layer": f"{model}DecoderLayer: a mixture-of-experts layer: its router's load-balancing loss",
        })
        for family, model in (("mixtral", "Mixtral"), ("qwen3_moe", "Qwen3Moe"), ("olmoe", "Olmoe"))
    },
}


def strategy(name: str):
    return create_strategy(name, StrategyOptions(), DistEnv())


def patched(model: torch.nn.Module) -> set[str]:
    """Names of the modules whose forward a kernel replaced (an instance attribute shadows the class's)."""
    return {name for name, module in model.named_modules() if "forward" in vars(module)}


def test_every_family_is_expected():
    assert EXPECTED.keys() == FAMILIES.keys()


@pytest.mark.parametrize("onednn", ENGINES, ids=["aten", "onednn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_at_once_keeps_the_plain_loss_and_gradients(family, onednn, caplog):
    """LoRA SFT on one CPU rank: the fused loss, the fused LoRA linears, the pruned last layer and, on
    oneDNN, the plain linears' oneDNN forward, together, where the family gets them; each it does not get is
    one line on the rank log with the reason. No dropout: the pruned layer draws masks for its label
    positions only (the fused linear alone draws PEFT's masks, tests/unit/test_lora_fused.py)."""
    kernels, reasons = EXPECTED[family]
    plain = lora_family(family)
    fast = copy.deepcopy(plain)
    with engine_scope("onednn" if onednn else "aten"), caplog.at_level("INFO", logger="training.kernels"):
        applied = apply(fast, strategy("single"), compiled=False)
        assert applied == kernels + (["onednn_linears"] if onednn else [])
        batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
        loss_a, grads_a = loss_and_grads(plain, batch)
        loss_b, grads_b = loss_and_grads(fast, batch)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernel ")]
    assert len(lines) == len(reasons), lines
    for kernel, why in reasons.items():
        assert any(line.startswith(f"kernel {kernel} not applied to {why}") for line in lines), (kernel, lines)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    adapters = sorted(name for name, p in plain.named_parameters() if p.requires_grad)
    assert sorted(grads_b) == sorted(grads_a) == adapters and len(adapters) >= 2 * 4 * 2  # A and B of each linear
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=atol, msg=name)


def test_the_strategy_and_compile_decide_which_kernels_apply(caplog):
    """ZeRO-3 gathers weights in module hooks: no kernel. Compiled layers: the fused loss only. A full
    fine-tune has no LoRA linears: the fused loss (its head trained) and the pruned last layer (on aten). Each
    says why."""

    def skipped() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernel ")]
        caplog.clear()
        return lines

    model = lora_llama()
    with caplog.at_level("INFO", logger="training.kernels"):
        assert apply(model, strategy("zero3"), compiled=False) == [] and patched(model) == set()
        assert skipped() == [
            "kernel fused_loss, lora_fused, last_layer not applied to LlamaForCausalLM: the strategy gathers each "
            "weight in its module's hooks, and the kernels read weights directly"
        ]
        assert apply(model, strategy("fsdp"), compiled=True) == ["fused_loss"]
        assert patched(model) == {"base_model.model"}  # the causal LM's forward, nothing inside it
        assert skipped() == [
            "kernel lora_fused, last_layer not applied to LlamaForCausalLM: model.compile compiles the layers, "
            "and fuses them itself"
        ]
        full = tiny_llama(layers=2)
        with engine_scope("aten"):
            assert apply(full, strategy("ddp"), compiled=False) == ["fused_loss", "last_layer"]
        assert skipped() == [
            "kernel lora_fused not applied to LlamaForCausalLM: it has no plain LoRA linear layers (full "
            "fine-tuning, QLoRA)",
        ]
