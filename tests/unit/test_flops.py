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


def tiny_mixtral():
    """2 layers, 32 wide: attention 3072 weights a layer, norms 64, a router of 4 x 32, 4 experts of
    3 x 64 x 32 (gate-up and down), 2 of which a token is routed to; vocabulary 100."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False)  # fmt: skip
    return MixtralForCausalLM(config)


def test_a_mixture_of_experts_counts_the_experts_a_token_is_routed_to():
    """MFU on active FLOPs: of the experts' 2 x 24576 weights, 2 of 4 experts' (12288 a layer) count."""
    model = tiny_mixtral()
    total = sum(p.numel() for p in model.parameters())
    assert total == 2 * 100 * 32 + 32 + 2 * (3072 + 64 + 128 + 24576)
    assert matmul_params(model) == (total - 100 * 32 - 2 * 12288, 0)


def test_lora_on_experts_gives_their_weights_a_gradient():
    """PEFT's all-linear adapts the router and the 3D expert weights in place (weight + B·A): those get a
    weight gradient every backward, so they count as trainable; attention's base weights, norms and the
    head stay frozen (3072 + 64 a layer, 3200 + 32)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_mixtral(), LoraConfig(r=4, target_modules="all-linear"))
    # adapters a layer: attention r(in + out) = 896; the router's 4 x (32 + 4) = 144; the experts' gate-up
    # (rank 2r per expert: 32 x 32 + 128 x 32) and down (16 x 64 + 32 x 16), half of them routed: 3328
    per_layer = 896 + 144 + 3328 + 128 + 12288
    assert matmul_params(model) == (2 * per_layer, 3200 + 32 + 2 * (3072 + 64))


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


def test_the_peak_is_the_best_of_several_trials():
    """A fake clock, advanced by a fake matmul: the second of four trials runs 5x faster than the others
    (the cores free for a moment); the peak is that trial's rate, not a mean over the slowed ones."""
    from training.flops import measured_peak_flops

    now = [0.0]
    durations = iter([0.0] * 2 + [0.1] * 4 + [0.02] * 16 + [0.1] * 8)  # warm-up, then trials 1, 2, 3 and 4
    calls = []

    def clock():
        return now[0]

    def matmul(a, b):
        calls.append(1)
        now[0] += next(durations, 0.1)

    peak = measured_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0, matmul=matmul, trials=4, clock=clock)
    per_product = 2 * 512**3
    assert peak == pytest.approx(16 * per_product / 0.32)  # trial 2: 16 products in 0.32 s
    assert len(calls) == 2 + 4 + 16 + 4 + 4  # every trial ran


def _fake_measure(rates):
    calls = []

    def measure():
        calls.append(1)
        return rates.pop(0)

    return measure, calls


def test_an_entry_of_another_torch_build_or_older_than_the_install_is_measured_again(tmp_path, monkeypatch):
    import training.flops as flops

    cache, cpu = tmp_path / "peak.json", torch.device("cpu")
    measure, calls = _fake_measure([1e11, 2e11, 3e11])
    assert flops.cached_measure("bf16", cpu, measure, cache) == 1e11
    assert flops.cached_measure("bf16", cpu, measure, cache) == 1e11 and len(calls) == 1
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["torch"] == flops.torch_build() and torch.__version__ in entry["torch"]
    monkeypatch.setattr(flops, "torch_build", lambda: "9.9.9 feedbeef")  # another torch: measured again
    assert flops.cached_measure("bf16", cpu, measure, cache) == 2e11 and len(calls) == 2
    # The same version string, reinstalled after the figure was measured: measured again.
    monkeypatch.setattr(flops, "_torch_installed_at", lambda: 1e12)
    assert flops.cached_measure("bf16", cpu, measure, cache) == 3e11 and len(calls) == 3


def test_old_format_and_malformed_entries_are_measured_over_and_replaced(tmp_path):
    import training.flops as flops

    cache, cpu = tmp_path / "peak.json", torch.device("cpu")
    key = flops._key("bf16", cpu, torch.get_num_threads())
    old = f"{key} | torch {torch.__version__}"
    for content in ("{not json", "[1, 2]", json.dumps({old: 5e10, key: 7e10}), json.dumps({key: {"flops": "x"}})):
        cache.write_text(content)
        measure, calls = _fake_measure([1e11])
        assert flops.cached_measure("bf16", cpu, measure, cache) == 1e11 and len(calls) == 1, content
        assert list(json.loads(cache.read_text())) == [key]  # rewritten; the old-format entries gone


def test_more_threads_slower_than_fewer_is_measured_again(tmp_path):
    """The issue's cache: 46 GFLOP/s at 2 threads (timed while the cores were busy) against 194 at 1.
    The 2-thread figure is measured again; a 1-thread figure below the 2-thread one is believed."""
    import training.flops as flops

    cache, cpu = tmp_path / "peak.json", torch.device("cpu")
    stamp = {"torch": flops.torch_build(), "measured_at": 4e9}
    cache.write_text(json.dumps({flops._key("fp32 gemm aten", cpu, 1): {"flops": 194e9, **stamp},
                                 flops._key("fp32 gemm aten", cpu, 2): {"flops": 46e9, **stamp},
                                 flops._key("fp32 gemm aten", cpu, 3): {"flops": 400e9, **stamp}}))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        measure, calls = _fake_measure([350e9])
        assert flops.cached_measure("fp32 gemm aten", cpu, measure, cache) == 350e9 and len(calls) == 1
        assert flops.cached_measure("fp32 gemm aten", cpu, measure, cache) == 350e9 and len(calls) == 1
        torch.set_num_threads(3)  # faster than 1 and 2 threads: consistent, read from the cache
        assert flops.cached_measure("fp32 gemm aten", cpu, measure, cache) == 400e9 and len(calls) == 1
        torch.set_num_threads(1)
        assert flops.cached_measure("fp32 gemm aten", cpu, measure, cache) == 194e9 and len(calls) == 1
    finally:
        torch.set_num_threads(threads)


def test_an_mfu_above_one_is_logged_as_null_and_drops_the_cached_peak(tmp_path, monkeypatch, caplog):
    """A cached peak far below the device's rate gives MFU > 1: the row logs None, the log says the peak
    (named with its file and value) is wrong, once, and the next peak_flops measures it again."""
    import training.flops as flops
    from training.loop import LoopConfig, PeakCheck

    cache, cpu = tmp_path / "peak.json", torch.device("cpu")
    monkeypatch.setenv(flops.PEAK_CACHE_VAR, str(cache))  # forget_peak and peak_flops find it by the hook
    measured = []
    monkeypatch.setattr(flops, "measured_peak_flops", lambda device, dtype, **kw: measured.append(1) or 1e6)
    peak = flops.peak_flops(cpu, torch.bfloat16)
    cfg = LoopConfig(max_steps=3, log_every=1, save_every=0, keep_last=1, world_size=2, flops_per_token=1e6,
                     peak_flops_per_rank=peak, forget_peak=lambda: flops.forget_peak(cpu, torch.bfloat16))
    check = PeakCheck(cfg)
    with caplog.at_level("WARNING", logger="sharpen"):
        assert check.mfu(1.0) == pytest.approx(0.5)  # 1e6 FLOPs a token, 1 token/s, 2 ranks
        assert check.mfu(10.0) is None and check.mfu(20.0) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "0.001 GFLOP/s" in warnings[0], warnings
    assert "re-measured on the next run" in warnings[0]
    assert json.loads(cache.read_text()) == {}  # the entry is gone
    monkeypatch.setattr(flops, "measured_peak_flops", lambda device, dtype, **kw: measured.append(1) or 5e10)
    assert flops.peak_flops(cpu, torch.bfloat16) == 5e10 and len(measured) == 2
