"""MFU's numerator: which parameters count, and how frozen ones count, for full, LoRA and ZeRO-3 models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.flops import matmul_params, measured_peak_flops, peak_flops, train_flops_per_token
from training.report import summary


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def test_full_model_counts_every_matmul_weight_but_the_input_embedding(model):
    total = sum(p.numel() for p in model.parameters())
    trainable, frozen = matmul_params(model)
    assert (trainable, frozen) == (total - 100 * 32, 0)
    assert train_flops_per_token(trainable, frozen, 2, 32, context=10) == 6 * trainable + 6 * 2 * 32 * 10


def test_lora_frozen_weights_get_no_weight_gradient(model):
    from peft import LoraConfig, get_peft_model

    base_trainable, _ = matmul_params(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable, frozen = matmul_params(peft_model)
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == adapters and frozen == base_trainable
    assert train_flops_per_token(trainable, frozen, 2, 32, 0) == 6 * adapters + 4 * base_trainable


def test_measured_peak_is_a_plausible_cpu_rate():
    peak = measured_peak_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    assert 1e8 < peak < 1e13


def test_report_summary_uses_steady_state_medians():
    rows = [
        {"step": s, "loss": 5.0 - s, "lr": 1e-3, "tokens": 100 * s, "tokens_per_s": t, "samples_per_s": t / 10,
         "elapsed_s": float(s), "mfu": t / 1e4}
        for s, t in ((1, 10.0), (2, 100.0), (3, 120.0), (4, 110.0))
    ]
    figures = summary(rows, [{"step": 4, "eval/loss": 1.5}], {"strategy": "ddp", "world_size": 2}, {})
    assert figures["tokens_per_s"] == 110.0  # the start-up interval (10 tok/s) is left out
    assert figures["mfu"] == pytest.approx(0.011)
    assert (figures["first_loss"], figures["final_loss"], figures["final_eval_loss"]) == (4.0, 1.0, 1.5)


def test_measuring_the_peak_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    measured_peak_flops(torch.device("cpu"), torch.float32, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


def test_the_peak_is_measured_once_per_machine_and_thread_count(tmp_path, monkeypatch):
    """The 0.3 s matmul loop runs before a run's first step only when the cache has no figure for this
    device, dtype and thread count."""
    import training.flops
    import training.kernels.cpu_gemm

    calls = []
    monkeypatch.setattr(training.flops, "measured_peak_flops", lambda device, dtype, **kw: calls.append(dtype) or 5e10)
    engines = 2 if training.kernels.cpu_gemm.onednn_available() else 1  # an fp32 CPU peak times each matmul engine
    cache = tmp_path / "peak_flops.json"
    threads = torch.get_num_threads()
    try:
        assert peak_flops(torch.device("cpu"), torch.float32, cache) == 5e10
        assert peak_flops(torch.device("cpu"), torch.float32, cache) == 5e10
        assert len(calls) == engines
        torch.set_num_threads(threads + 1)
        peak_flops(torch.device("cpu"), torch.float32, cache)
        assert len(calls) == 2 * engines and len(json.loads(cache.read_text())) == 2 * engines
    finally:
        torch.set_num_threads(threads)
    cache.write_text("not json")
    assert peak_flops(torch.device("cpu"), torch.float32, cache) == 5e10  # a damaged file is measured over
    assert len(json.loads(cache.read_text())) == engines
