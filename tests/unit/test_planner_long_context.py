"""The planner on long rows: sequence parallelism's activations (each rank its chunk of the row, plus one layer's
all-to-all buffers) and all-to-all volume, the chunked loss that holds no logits, offload checkpointing's host
bytes, the degree `strategy.name: auto` chooses and the hint names when whole rows fit nothing, and the
shipped 64k example with the figures the README shows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.memory import allocated_during
from support.planner_job import REPO, job

from launcher.candidates import GIB, estimate
from launcher.errors import UserError
from launcher.jobfile import load_job
from launcher.planner import build_plan
from launcher.shapes import (
    ModelShape,
    activation_phases,
    all_to_all_bytes,
    chunked_loss,
    chunked_loss_bytes,
    count_parameters,
    exchange_bytes,
    offloaded_activations,
)
from strategies.footprint.counts import ParamCounts, Setting

CONFIGS = REPO / "examples" / "configs"
PLANS = REPO / "examples" / "plans"
TINY = ParamCounts(0, 0, 0, 0, 2, 256, 1000, 688, 8, 2, 32)  # 2 layers, hidden 256, 8 heads (2 kv) of 32


@pytest.fixture(scope="module")
def llama8b() -> ParamCounts:
    return count_parameters(job(CONFIGS / "llama3-8b", finetune={"type": "full"}))


# -- activations ---------------------------------------------------------------------------------------
def test_two_ranks_a_row_halve_the_activations_plus_one_layers_exchange(llama8b):
    """Each rank holds half of the row's tokens of every activation: the same per-sample attention at N=1 over
    the whole row holds exactly twice the bytes at the loss, and in a layer's backward twice less the exchange
    buffers (one layer's q, k, v and output) that only the split row has."""
    whole = Setting(strategy="zero2", micro_batch_size=2, max_length=8192, device="cpu", gradient_checkpointing="full")
    split = replace(whole, sequence_parallel=2)  # sdpa per sample at N=1 on the CPU, as at N=2 everywhere
    (loss_1, layers_1), _ = activation_phases(llama8b, whole)
    (loss_2, layers_2), _ = activation_phases(llama8b, split)
    assert 2 * loss_2 == loss_1
    shape, _ = ModelShape.of(llama8b)
    exchange = exchange_bytes(shape, split)
    assert exchange == 2 * 8192 * 128 * (2 * 32 + 2 * 8)  # bf16, 8,192 tokens a rank, 32 query and 8 kv heads
    assert 2 * (layers_2 - exchange) == layers_1
    # on a GPU whole rows take sdpa with no per-sample copy: about half, never more
    gpu = replace(whole, device="cuda", micro_batch_size=1, max_length=65536, kernels=True)
    ratio = max(activation_phases(llama8b, gpu)[0]) / max(activation_phases(llama8b, replace(gpu, sequence_parallel=2))[0])
    assert 1.8 < ratio < 2.0


def test_the_all_to_all_volume_by_hand():
    """Per layer q (8 heads x 32), k and v (2 heads x 32 each) out and the output (8 x 32) back, bf16, over the
    rank's tokens; forward, backward and with checkpointing the recompute; half of each leaves one of 2 ranks."""
    two = Setting(strategy="fsdp", sequence_parallel=2, max_length=1024, grad_accum=3, gradient_checkpointing="full")
    per_layer = 2 * 512 * 32 * (8 + 2 + 2 + 8)  # 512 tokens a rank
    assert all_to_all_bytes(TINY, two) == 2 * 3 * per_layer // 2 * 3 == 5_898_240  # layers x passes x 1/2 x accum
    # 4 ranks: 2 kv heads do not divide among them, so k and v go out repeated to the 8 query heads
    four = replace(two, sequence_parallel=4, grad_accum=1, gradient_checkpointing="none")
    assert all_to_all_bytes(TINY, four) == 2 * 2 * (2 * 256 * 32 * (8 + 8 + 8 + 8)) * 3 // 4 == 1_572_864
    assert all_to_all_bytes(TINY, replace(two, sequence_parallel=1)) == 0


def test_offload_checkpointing_keeps_one_layer_input_on_the_device(llama8b):
    """Full checkpointing keeps every layer's input; offload moves them to the host, one layer's on the device:
    31 of 32 inputs leave both moments, and all 32 are the host's (MemoryEstimate.offloaded)."""
    full = Setting(strategy="zero1", world_size=8, max_length=65536, gradient_checkpointing="full", kernels=True)
    offload = replace(full, gradient_checkpointing="offload")
    one_input = 2 * 4096 * 65536  # bf16 residual stream of 64k tokens
    assert offloaded_activations(llama8b, offload) == 32 * one_input == 16 * GIB
    assert offloaded_activations(llama8b, full) == 0
    for moment_full, moment_offload in zip(*(activation_phases(llama8b, s)[0] for s in (full, offload)), strict=True):
        assert moment_full - moment_offload == 31 * one_input
    assert estimate(llama8b, offload)[0].offloaded == estimate(llama8b, full)[0].offloaded + 16 * GIB


# -- the chunked loss --------------------------------------------------------------------------------------
def test_the_chunked_loss_holds_one_chunk_of_logits_where_the_kernels_apply(llama8b):
    """Llama (a fused-loss family), sft: one chunk of logits, the hidden states' gradient and a trained head's
    fp32 gradient in place of 12 bytes x tokens x vocab; not under zero3 (it gathers weights in module hooks),
    not for dpo, not in a Setting built by hand (the library's plain loss)."""
    plain = Setting(strategy="fsdp", world_size=8, max_length=16384)
    chunked = replace(plain, kernels=True)
    assert llama8b.fusable_loss and chunked_loss(llama8b, chunked) and not chunked_loss(llama8b, plain)
    assert not chunked_loss(llama8b, replace(chunked, strategy="zero3"))
    assert not chunked_loss(llama8b, replace(chunked, method="dpo"))
    tokens, vocab = 16384, 128256
    chunk_tokens = (1 << 25) // vocab  # 261 tokens of logits a chunk
    expected = 2 * tokens * 4096 + (4 + 2 * 2 + 4) * chunk_tokens * vocab + 4 * vocab * 4096
    assert chunked_loss_bytes(llama8b, chunked, tokens, 2) == expected
    at_loss_plain, at_loss_chunked = (activation_phases(llama8b, s)[0][0] for s in (plain, chunked))
    assert at_loss_plain - at_loss_chunked == 12 * tokens * vocab - expected  # 23.5 GiB - 2.5 GiB
    assert activation_phases(llama8b, plain)[0][1] == activation_phases(llama8b, chunked)[0][1]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_head_loss_measured_on_the_cpu(finetune, monkeypatch):
    """The fused loss (training/kernels/fused_loss.py) on a Llama stack in bf16 with 2,048 tokens of a 4k
    vocabulary in two chunks (of 2^22 logits, the planner's and the kernel's chunk made 8x smaller): the planned activations at the loss against the CPU allocator's peak, a frozen
    head (LoRA) and a trained one (full fine-tuning, its fp32 weight-gradient sum) alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.kernels import fused_loss
    from training.kernels.fused_loss import LABELS, fuse_head_loss

    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 1 << 22)
    torch.manual_seed(0)
    shape = dict(vocab_size=4000, hidden_size=128, intermediate_size=344, num_hidden_layers=2)
    config = LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if finetune == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    model = model.to(torch.bfloat16)
    assert fuse_head_loss(model)
    ids = torch.randint(0, 4000, (1, 2048))

    def step():
        model(input_ids=ids, **{LABELS: ids}).loss.backward()

    step()
    got = max(allocated_during(step)[1])
    counts = ParamCounts(0, 0, 0, 0, 2, 128, 4000, 344, 4, 2, 32, fusable_loss=True)
    setting = Setting(strategy="zero2", finetune=finetune, lora_r=8, max_length=2048, kernels=True)
    planned = max(activation_phases(counts, setting)[0])
    plain = max(activation_phases(counts, replace(setting, kernels=False))[0])
    assert planned == pytest.approx(got, rel=0.05) and plain > 1.5 * got


# -- the degree: auto's choice and the hint ------------------------------------------------------------------
def plan_job(*overrides: str):
    return load_job(PLANS / "llama3-8b-64k.yaml", list(overrides))


def test_auto_splits_rows_that_fit_no_strategy_whole(llama8b):
    """128k tokens a row fit no strategy on 8 x 80 GB with whole rows; auto takes the smallest degree that fits
    (2), says so, and the plan's job runs with it."""
    spec = plan_job("strategy.sequence_parallel=1", "data.max_length=131072")
    plan, notices = build_plan(spec, Path("unused"), counts=llama8b)
    assert plan.sequence_parallel == plan.job["strategy"]["sequence_parallel"] == plan.spec.strategy.sequence_parallel == 2
    assert plan.micro_batch_size * plan.grad_accum * plan.world_size // 2 == plan.global_batch_size
    assert plan.chosen["sequence_parallel"] == 2 and plan.chosen["all_to_all_bytes_per_step"] > 0
    assert any(n.startswith("sequence parallelism: whole rows of 131072 tokens fit no strategy; each row is split "
                            "over 2 ranks (strategy.sequence_parallel: 2") for n in notices)
    # a strategy named in the job file keeps the job's degree: the plan refuses, and names the degree
    with pytest.raises(UserError) as error:
        build_plan(plan_job("strategy.sequence_parallel=1", "data.max_length=131072", "strategy.name=zero2"),
                   Path("unused"), counts=llama8b)
    assert "strategy.sequence_parallel: 2 (each row split over 2 ranks): zero2 needs" in error.value.hint


def test_the_hint_names_the_smallest_degree_that_fits(llama8b):
    """64k rows without checkpointing: only 8 ranks a row fit (zero2 + offload optimizer), and the hint says so
    beside full checkpointing; a degree the model's 32 heads or the 8 ranks do not divide is never offered."""
    with pytest.raises(UserError) as error:
        build_plan(plan_job("strategy.sequence_parallel=1", "model.gradient_checkpointing=none", "strategy.name=zero2"),
                   Path("unused"), counts=llama8b)
    hint = error.value.hint
    assert "strategy.sequence_parallel: 8 (each row split over 8 ranks): zero2 + offload optimizer needs" in hint
    assert "model.gradient_checkpointing: full: zero1 needs" in hint
    assert "sequence_parallel: 2 " not in hint and "sequence_parallel: 4 " not in hint


@pytest.mark.parametrize(
    "overrides,chosen,degree,micro,gib,all_to_all_gib",
    [  # README's "Long context" table
        ((), ("zero1", "none"), 2, 1, 58.69, 120.0),
        (("strategy.sequence_parallel=1",), ("zero1", "none"), 1, 1, 73.71, 0),
        (("model.gradient_checkpointing=offload",), ("zero1", "none"), 2, 2, 60.71, 120.0),  # 16 GiB host a rank
        (("strategy.sequence_parallel=1", "data.max_length=131072"), ("zero2", "none"), 2, 1, 64.10, 240.0),
    ],
)
def test_the_long_context_example_gives_the_documented_figures(llama8b, overrides, chosen, degree, micro, gib,
                                                               all_to_all_gib):
    plan = build_plan(plan_job(*overrides), Path("unused"), counts=llama8b)[0]
    assert ((plan.strategy, plan.offload), plan.sequence_parallel, plan.micro_batch_size) == (chosen, degree, micro)
    assert round(plan.chosen["bytes_per_rank"]["total"] / GIB, 2) == gib
    assert round(plan.chosen.get("all_to_all_bytes_per_step", 0) / GIB, 2) == all_to_all_gib
