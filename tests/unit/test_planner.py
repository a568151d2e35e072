"""The planner: its memory model against what autograd keeps, the ZeRO paper's numbers, `strategy: auto`
and `micro_batch_size: auto`, and a job that fits nothing (exit 2). What real ranks hold:
tests/ranks/test_planner_state.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.memory import measured_peak
from support.planner_job import REPO, job

from launcher.candidates import GIB, estimate
from launcher.errors import UserError
from launcher.plan import Plan
from launcher.planner import build_plan
from launcher.shapes import activation_phases, count_parameters
from strategies import footprint
from strategies.footprint.counts import ParamCounts, Setting

CONFIGS = REPO / "examples" / "configs"


# -- the ZeRO paper's numbers and the published configs ------------------------------------------------
@pytest.fixture(scope="module")
def llama8b() -> ParamCounts:
    return count_parameters(job(CONFIGS / "llama3-8b", finetune={"type": "full"}))


def test_published_configs_count_their_parameters(llama8b):
    assert llama8b.total == 8_030_261_248
    lora = count_parameters(job(CONFIGS / "llama3-8b", finetune={"type": "lora", "r": 16}))
    assert (lora.trainable, lora.frozen) == (41_943_040, 8_030_261_248)
    qlora = count_parameters(job(CONFIGS / "llama3-70b", finetune={"type": "qlora", "r": 16}))
    assert qlora.frozen == 70_553_706_496 and qlora.trainable == 207_093_760
    embeddings_head_norms = 2 * 128256 * 8192 + (2 * 80 + 1) * 8192
    assert qlora.frozen_quantized == 70_553_706_496 - embeddings_head_norms  # every other weight is 4-bit


@pytest.mark.parametrize("strategy,gb", [("zero1", 44.2), ("zero2", 30.1), ("zero3", 16.1)])
def test_zero_paper_numbers_for_llama3_8b_on_8_gpus(llama8b, strategy, gb):
    """Mixed-precision Adam, 16 bytes per parameter (2 bf16 params + 2 bf16 grads + 12 fp32 master, momentum,
    variance), sharded by stage: 2+2+12/8, 2+(2+12)/8, 16/8 bytes per parameter, before activations."""
    held = footprint(strategy).state(llama8b, Setting(strategy=strategy, world_size=8, compute_dtype="bf16"))
    assert (held["params"] + held["grads"] + held["optimizer"]) / 1e9 == pytest.approx(gb, abs=0.1)


# -- activations: predicted == the peak autograd and the loss really take (CPU allocator) -------------
def activations(counts: ParamCounts, setting: Setting) -> int:
    """The activation model's peak: the larger of its two moments (at the loss, in the layers' backward)."""
    return max(activation_phases(counts, setting)[0])


@pytest.mark.parametrize(
    "finetune,dtype,samples,checkpointing",
    [
        ("full", "fp32", 1, "none"),
        ("full", "fp32", 2, "none"),
        ("lora", "bf16", 2, "none"),
        ("full", "bf16", 1, "full"),
        ("full", "fp32", 2, "selective"),
        ("full", "bf16", 1, "selective"),
        ("lora", "bf16", 2, "selective"),  # LoRA's B is recomputed (a low-rank product)
    ],
)
def test_activation_model_matches_the_measured_peak(finetune, dtype, samples, checkpointing):
    """A Llama layer stack in the compute dtype (as fsdp/zero run it), `samples` sequences in one padding-free
    row (a block mask when there are two), cross-entropy over every position."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from strategies.base import enable_gradient_checkpointing

    torch.manual_seed(0)
    shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2)
    config = LlamaConfig(**shape, num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    if checkpointing != "none":
        enable_gradient_checkpointing(model, checkpointing)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).to(
            model.dtype
        )  # as zero casts
    tokens, length = 256, 256 // samples
    segment = torch.arange(tokens) // length
    mask = (segment[:, None] == segment) & (torch.arange(tokens)[:, None] >= torch.arange(tokens))
    got = measured_peak(model, torch.randint(0, 1000, (1, tokens)), mask[None, None] if samples > 1 else None)
    counts = ParamCounts(0, 0, 0, 0, 2, 256, 1000, 688, 8, 2, 32)
    setting = Setting(
        strategy="zero2", compute_dtype=dtype, finetune=finetune, micro_batch_size=samples, max_length=length,
        gradient_checkpointing=checkpointing, lora_r=8,
    )  # fmt: skip
    assert activations(counts, setting) == pytest.approx(got, rel=0.06)


def test_single_holds_no_gradients_at_the_loss_without_accumulation(tmp_path):
    """The single strategy (autocast over fp32 weights) sets gradients to None after each step, and the
    backward makes them after the loss's peak: the peak over forward and backward, measured with the
    gradients unallocated, is the estimate's backward less params and optimizer, not that plus the grads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=4000, hidden_size=128, intermediate_size=344, num_hidden_layers=2)
    config = LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)  # fp32 weights, bf16 autocast: single's forward_context
    got = measured_peak(model, torch.randint(0, 4000, (1, 256)), None, False, autocast=True)
    config.save_pretrained(tmp_path / "model")
    counts = count_parameters(job(tmp_path / "model", finetune={"type": "full"}))
    setting = Setting(strategy="single", compute_dtype="bf16", max_length=256, device="cpu")
    memory = estimate(counts, setting)[0]
    above_state = memory.backward - memory.params - memory.optimizer
    assert above_state == pytest.approx(got, rel=0.06)
    assert memory.buffers + memory.activations == above_state  # no gradients at the peak
    accumulating = estimate(counts, replace(setting, grad_accum=2))[0]  # the first micro-step's are held
    assert accumulating.backward == memory.backward + memory.grads


BENCH_SHAPE = dict(  # bench/memory_check.py's Llama-3-shaped model
    vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4,
)  # fmt: skip


@pytest.mark.parametrize(
    "strategy,micro,accum,length,attention,h200_gib",
    [
        # checked on an H200 (2026-11-24), bench/memory_check.py; gradient checkpointing was configured for
        # the last four but did not run (the model was in eval mode), so they are planned without it here
        ("single", 1, 1, 2048, "sdpa", 16.57),  # the optimizer step's peak, not params+grads+...+activations
        ("single", 2, 2, 2048, "sdpa", 24.15),
        ("fsdp", 1, 1, 4096, "sdpa", 18.59),  # at the loss: no gradients, no gathered group
        ("fsdp", 1, 2, 2048, "sdpa", 17.58),  # at the loss: the accumulated unsharded grads, once
        ("zero2", 1, 2, 4096, "sdpa", 21.89),
    ],
)
def test_full_fine_tuning_peaks_measured_on_an_h200(
    tmp_path, strategy, micro, accum, length, attention, h200_gib
):
    from transformers import LlamaConfig

    LlamaConfig(**BENCH_SHAPE, tie_word_embeddings=False).save_pretrained(tmp_path)
    counts = count_parameters(job(tmp_path, finetune={"type": "full"}))
    setting = Setting(
        strategy=strategy, compute_dtype="bf16", micro_batch_size=micro, grad_accum=accum, max_length=length,
        attention=attention,
    )  # fmt: skip
    memory = estimate(counts, setting)[0]
    assert memory.total / GIB == pytest.approx(h200_gib, rel=0.03)
    columns = memory.params + memory.grads + memory.optimizer + memory.buffers + memory.activations
    if strategy == "fsdp" or accum == 1:  # the sum of the columns counts what is never held at once
        assert columns / GIB > 1.07 * h200_gib


def test_cpu_sdpa_packed_rows_have_no_mask():
    """On the CPU, sdpa runs a padding-free row per sample (training/kernels/attention.py): no T x T block mask,
    neither the bool mask nor each layer's float copy of it."""
    counts = ParamCounts(0, 0, 0, 0, 2, 256, 1000, 688, 8, 2, 32)
    cuda = Setting(strategy="zero2", compute_dtype="fp32", micro_batch_size=2, max_length=512)
    cpu = replace(cuda, device="cpu")
    tokens = 2 * 512
    mask = 2 * tokens * tokens * 4 + tokens * tokens  # each layer's fp32 mask, the bool mask once
    # the per-sample kernel's output is concatenated (one more tensor per layer); k and v are repeated as with a mask
    concatenated = 2 * tokens * 8 * 32 * 4
    assert activations(counts, cuda) - activations(counts, cpu) == mask - concatenated
    assert activations(counts, replace(cpu, micro_batch_size=1, max_length=1024)) == activations(
        counts, replace(cuda, micro_batch_size=1, max_length=1024)
    )  # one sample: no mask on either


# -- choices ---------------------------------------------------------------------------------------------
def plan_for(counts: ParamCounts, gpus: int, gb: float | None, **sections) -> Plan:
    resources = {"gpus_per_node": gpus, **({"gpu_memory_gb": gb} if gb else {})}
    defaults = {
        "model": {"dtype": "bf16", "gradient_checkpointing": True}, "finetune": {"type": "full"},
        "data": {"max_length": 2048}, "train": {"micro_batch_size": "auto", "global_batch_size": 64},
        "strategy": {"name": "auto"}, "resources": resources, "cluster": {"kind": "slurm"}, "device": "cuda",
    }  # fmt: skip
    spec = job(CONFIGS / "llama3-8b", **{**defaults, **sections})
    return build_plan(spec, Path("unused"), counts=counts)[0]


def test_auto_picks_the_fastest_strategy_that_fits_and_the_largest_micro_batch(llama8b):
    """Llama-3-8B full fine-tuning on 8 GPUs, global batch 64: ddp never fits (16 bytes/param, 128 GB); on
    40 GB zero1 does not either (the loss in chunks, no logits: micro batches of 4 fit zero2)."""
    expected = {80: ("zero1", "none", 8), 40: ("zero2", "none", 4), 24: ("zero2", "optimizer", 4)}
    for gb, (strategy, offload, micro) in expected.items():
        plan = plan_for(llama8b, 8, gb)
        assert (plan.strategy, plan.offload, plan.micro_batch_size) == (strategy, offload, micro), gb
        assert plan.micro_batch_size * plan.grad_accum * plan.world_size == 64
        chosen = next(c for c in plan.candidates if (c["strategy"], c["offload"]) == (strategy, offload))
        assert (
            chosen == plan.chosen
            and chosen["fits"]
            and chosen["bytes_per_rank"]["total"] <= plan.usable_bytes
        )
        faster = plan.candidates[: plan.candidates.index(chosen)]
        assert faster and not any(c["fits"] for c in faster)
    # Twice the micro batch does not fit: the plan took the largest that does.
    double = plan_for(
        llama8b, 8, 40, strategy={"name": "zero2"}, train={"micro_batch_size": 8, "global_batch_size": 64}
    )
    assert double.strategy == "zero2" and not double.chosen["fits"]


def test_auto_with_compile_skips_deepspeed(llama8b):
    """model.compile runs under single, ddp and fsdp only: auto passes over zero1 (80 GB) for fsdp."""
    plan = plan_for(llama8b, 8, 80, model={"dtype": "bf16", "gradient_checkpointing": True, "compile": True})
    assert plan.strategy == "fsdp" and plan.chosen["fits"]
    assert any(c["strategy"] == "zero1" and c["fits"] for c in plan.candidates)


def test_unknown_gpu_memory_is_unlimited_but_still_estimated(llama8b):
    plan, notices = build_plan(
        job(CONFIGS / "llama3-8b", strategy={"name": "auto"}, resources={"gpus_per_node": 2},
            train={"micro_batch_size": "auto", "global_batch_size": 64}),
        Path("unused"), device="cpu", counts=llama8b,
    )  # fmt: skip
    assert (plan.strategy, plan.micro_batch_size, plan.usable_bytes) == ("ddp", 8, None)
    assert all(c["fits"] for c in plan.candidates) and plan.chosen["bytes_per_rank"]["total"] > 100 * GIB
    assert any("not checked" in n for n in notices)


def test_offload_is_chosen_only_when_nothing_else_fits(llama8b):
    plan = plan_for(llama8b, 1, 80, train={"micro_batch_size": 1, "global_batch_size": 8})
    assert (plan.strategy, plan.offload) == ("zero2", "optimizer")
    assert plan.job["strategy"]["offload"] == "optimizer"  # what the ranks will run with
    assert plan.chosen["bytes_per_rank"]["offloaded"] > 8e9 * 12


def test_a_job_that_fits_nothing_says_by_how_much_and_what_would_fit(llama8b):
    """Without checkpointing, 2 x 4096 tokens of Llama-3-8B activations alone outgrow a 16 GB GPU; sharding
    (more GPUs) does not shrink them, checkpointing does."""
    with pytest.raises(UserError) as error:
        plan_for(
            llama8b, 1, 16, model={"dtype": "bf16", "gradient_checkpointing": False}, data={"max_length": 4096},
            train={"micro_batch_size": 2, "global_batch_size": 8},
        )  # fmt: skip
    message, hint = error.value.message, error.value.hint
    assert message.startswith(
        "the job fits no strategy on GPUs of 16.00 GiB (14.20 GiB usable): the closest, "
    )
    assert "zero3 + offload params at micro batch 2" in message and message.endswith("more")
    assert "model.gradient_checkpointing: full: zero3 + offload params needs" in hint
    assert "selective" not in hint  # it keeps each layer's matmul outputs: still too much here
    assert "GPUs:" not in hint  # more GPUs shard the state, not the activations


def test_the_hint_offers_selective_checkpointing_before_full(llama8b):
    """On a 24 GB GPU both fit: selective (it runs no large matmul twice) is named first, then full."""
    with pytest.raises(UserError) as error:
        plan_for(
            llama8b, 1, 24, model={"dtype": "bf16", "gradient_checkpointing": False}, data={"max_length": 4096},
            train={"micro_batch_size": 2, "global_batch_size": 8},
        )  # fmt: skip
    hint = error.value.hint
    selective, full = hint.find("model.gradient_checkpointing: selective: "), hint.find("gradient_checkpointing: full: ")
    assert 0 < selective < full, hint


def test_the_example_plans_fit_as_documented(capsys):
    """examples/plans/*.yaml through `sharpen plan --json`, as docs/PLANNER.md shows them."""
    from launcher.cli import main

    expected = {
        "llama3-8b-lora-1x24gb": ("single", "none", 4),
        "llama3-8b-full-8x80gb": ("zero1", "none", 16),
        "llama3-70b-qlora-2x80gb": ("ddp", "none", 4),
        "llama3-70b-full-4x8x80gb": ("zero3", "none", 2),
    }
    for name, (strategy, offload, micro) in expected.items():
        assert main(["plan", str(REPO / "examples" / "plans" / f"{name}.yaml"), "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["strategy"], plan["offload"], plan["micro_batch_size"]) == (strategy, offload, micro), (
            name
        )
        keys = {"params", "grads", "optimizer", "activations", "total"}
        assert all(keys <= set(c["bytes_per_rank"]) and "fits" in c for c in plan["candidates"])
        assert plan["chosen"]["fits"] and plan["chosen"]["bytes_per_rank"]["total"] <= plan["usable_bytes"]


def _write_plan_repeatedly(plan_json: str, run_dir: str, times: int) -> None:
    plan = Plan.model_validate_json(plan_json)
    for _ in range(times):
        plan.write(Path(run_dir))


def test_nodes_writing_the_plan_at_once_do_not_collide(llama8b, tmp_path):
    """Every node of a multi-machine run writes plan.json into the shared run dir. With one temporary name
    for all, a node could rename away the file another was about to rename (FileNotFoundError, seen in
    test_slurm's two-machine run); each process now writes its own."""
    import multiprocessing

    plan = plan_for(llama8b, 8, 80)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        pool.starmap(_write_plan_repeatedly, [(plan.model_dump_json(), str(tmp_path), 200)] * 2)
    assert Plan.read(tmp_path) == plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
