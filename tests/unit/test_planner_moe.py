"""The planner on mixtures of experts: every expert counted for memory and the routed ones for FLOPs (the
active parameters), PEFT's own adapters on them, the MoE layers' activations against the peak autograd
really takes, and `sharpen plan` of the shipped Qwen3-30B-A3B and Mixtral-8x7B configs (config.json
alone) with the figures the README shows."""

from __future__ import annotations

import json

import pytest
import torch
from support.memory import measured_peak
from support.planner_job import REPO, job

from launcher.candidates import GIB
from launcher.planner import build_plan
from launcher.shapes import activation_phases, count_parameters
from strategies.footprint.counts import Setting
from training.tiny import MOE_FAMILIES, build_tiny_model

CONFIGS = REPO / "examples" / "configs"
PLANS = REPO / "examples" / "plans"


def expert_weights(config) -> int:
    """Every expert weight of a model by hand: per layer experts x (gate-up 2I x H + down H x I)."""
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return config.num_hidden_layers * experts * 3 * width * config.hidden_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: build_tiny_model(root / family, family) for family in MOE_FAMILIES}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tiny_moe_counts_are_the_models_own(tiny, family):
    """Full: every parameter of the instantiated model, trainable; active: 2 of the 4 experts' weights.
    LoRA: the trainable parameters PEFT gives the real model (all-linear adapts attention, the router
    and the 3D experts), over the whole base frozen."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from training.model import lora_config

    model = AutoModelForCausalLM.from_pretrained(tiny[family])
    real = sum(p.numel() for p in model.parameters())
    full = count_parameters(job(tiny[family], finetune={"type": "full"}))
    assert full.total == full.trainable == real
    assert full.active == real - expert_weights(model.config) * (4 - 2) // 4
    assert (full.num_experts, full.experts_per_token, full.moe_layers) == (4, 2, 2)
    spec = job(tiny[family], finetune={"type": "lora", "r": 8})
    lora = count_parameters(spec)
    adapted = get_peft_model(model, lora_config(spec, model))
    assert lora.trainable == sum(p.numel() for p in adapted.parameters() if p.requires_grad) > 0
    assert lora.frozen == real and lora.adapted_experts and not full.adapted_experts


def qwen3_30b_a3b_by_hand() -> tuple[int, int]:
    """(total, active) from config.json: embeddings and head, a final norm, and 48 layers of attention
    (q, k, v, o, q/k norms), two norms, a router and 128 experts of which 8 are routed."""
    vocab, h, layers, heads, kv, d, experts, routed, i = 151936, 2048, 48, 32, 4, 128, 128, 8, 768
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + 2 * d
    layer = attention + 2 * h + experts * h + experts * 3 * i * h
    total = 2 * vocab * h + h + layers * layer
    return total, total - layers * (experts - routed) * 3 * i * h


def mixtral_8x7b_by_hand() -> tuple[int, int]:
    vocab, h, layers, heads, kv, d, experts, routed, i = 32000, 4096, 32, 32, 8, 128, 8, 2, 14336
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    layer = attention + 2 * h + experts * h + experts * 3 * i * h
    total = 2 * vocab * h + h + layers * layer
    return total, total - layers * (experts - routed) * 3 * i * h


@pytest.mark.parametrize(
    "name,by_hand,published",
    [
        # the model cards: 30.5B total, 3.3B activated (3.35B, rounded down); 46.7B total, 12.9B active
        ("qwen3-30b-a3b", qwen3_30b_a3b_by_hand, (30.5e9, 3.3e9)),
        ("mixtral-8x7b", mixtral_8x7b_by_hand, (46.7e9, 12.9e9)),
    ],
)
def test_the_shipped_moe_configs_count_their_parameters(name, by_hand, published):
    counts = count_parameters(job(CONFIGS / name, finetune={"type": "full"}))
    assert (counts.total, counts.active) == by_hand()
    assert counts.total == pytest.approx(published[0], rel=0.01)
    assert counts.active == pytest.approx(published[1], rel=0.02 if name == "qwen3-30b-a3b" else 0.01)


@pytest.mark.parametrize(
    "family,finetune,dtype,samples,checkpointing",
    [
        ("mixtral", "full", "fp32", 2, "none"),
        ("mixtral", "lora", "bf16", 2, "none"),  # PEFT's weight + B·A kept for the backward
        ("mixtral", "full", "fp32", 1, "full"),
        ("mixtral", "full", "bf16", 1, "selective"),  # fp32 routing weights
        ("qwen3_moe", "full", "bf16", 1, "full"),
        ("qwen3_moe", "full", "fp32", 2, "selective"),
        ("qwen3_moe", "lora", "fp32", 1, "full"),
    ],
)
def test_moe_activation_model_matches_the_measured_peak(tmp_path, family, finetune, dtype, samples, checkpointing):
    """A 2-layer MoE stack (4 experts, 2 routed, 256 wide) in the compute dtype, as fsdp and zero run it,
    `samples` sequences in one padding-free row, cross-entropy over every position; planned from its
    config as a job would be."""
    import transformers
    from peft import get_peft_model

    from strategies.base import enable_gradient_checkpointing
    from training.model import lora_config

    torch.manual_seed(0)
    shape = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 num_experts_per_tok=2, attn_implementation="sdpa")  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(**shape, intermediate_size=256, num_local_experts=4, sliding_window=None)
    else:
        config = transformers.Qwen3MoeConfig(**shape, head_dim=32, intermediate_size=688, moe_intermediate_size=256,
                                             num_experts=4)  # fmt: skip
    config.save_pretrained(tmp_path)
    spec = job(tmp_path, finetune={"type": finetune, "r": 8})
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    if checkpointing != "none":
        enable_gradient_checkpointing(model, checkpointing)
    if finetune == "lora":
        model = get_peft_model(model, lora_config(spec, model)).to(model.dtype)  # as zero casts
    tokens, length = 256, 256 // samples
    segment = torch.arange(tokens) // length
    mask = (segment[:, None] == segment) & (torch.arange(tokens)[:, None] >= torch.arange(tokens))
    got = measured_peak(model, torch.randint(0, 1000, (1, tokens)), mask[None, None] if samples > 1 else None)
    setting = Setting(
        strategy="zero2", compute_dtype=dtype, finetune=finetune, micro_batch_size=samples, max_length=length,
        gradient_checkpointing=checkpointing, lora_r=8,
    )  # fmt: skip
    assert max(activation_phases(count_parameters(spec), setting)[0]) == pytest.approx(got, rel=0.06)


@pytest.fixture(scope="module")
def shipped_counts():
    """The four example jobs' counts, each once (the plans below only change the machine)."""
    counts = {}
    for name in ("qwen3-30b-a3b-lora-80gb", "qwen3-30b-a3b-full-8x80gb", "mixtral-8x7b-lora-80gb",
                 "mixtral-8x7b-full-8x80gb"):  # fmt: skip
        counts[name] = count_parameters(plan_job(name))
    return counts


def plan_job(name: str, **resources):
    """examples/plans/NAME.yaml, as `sharpen plan` reads it with --set resources.KEY=VALUE."""
    from launcher.jobfile import load_job

    return load_job(PLANS / f"{name}.yaml", [f"resources.{key}={value}" for key, value in resources.items()])


@pytest.mark.parametrize(
    "name,resources,chosen,micro,gib",
    [  # README's "Mixtures of experts" table
        ("qwen3-30b-a3b-lora-80gb", {}, ("zero2", "optimizer"), 4, 74.32),
        ("qwen3-30b-a3b-lora-80gb", {"gpus_per_node": 2}, ("zero1", "none"), 2, 73.94),
        ("qwen3-30b-a3b-full-8x80gb", {}, ("zero3", "none"), 2, 74.81),
        ("mixtral-8x7b-lora-80gb", {}, ("fsdp", "params"), 32, 53.84),
        ("mixtral-8x7b-lora-80gb", {"gpus_per_node": 2}, ("fsdp", "none"), 8, 67.43),
        ("mixtral-8x7b-full-8x80gb", {}, ("zero3", "optimizer"), 16, 60.77),  # no offload: 112.47 GiB
        ("mixtral-8x7b-full-8x80gb", {"nodes": 2}, ("zero3", "none"), 8, 70.22),
    ],
)
def test_the_moe_example_plans_give_the_documented_figures(shipped_counts, name, resources, chosen, micro, gib):
    plan = build_plan(plan_job(name, **resources), REPO / "runs" / "unused", counts=shipped_counts[name])[0]
    assert ((plan.strategy, plan.offload), plan.micro_batch_size) == (chosen, micro)
    assert round(plan.chosen["bytes_per_rank"]["total"] / GIB, 2) == gib
    if name == "mixtral-8x7b-full-8x80gb" and not resources:
        zero3 = next(c for c in plan.candidates if (c["strategy"], c["offload"]) == ("zero3", "none"))
        assert not zero3["fits"] and round(zero3["bytes_per_rank"]["total"] / GIB, 2) == 112.47


def test_sharpen_plan_of_a_config_only_moe_dir_names_the_active_parameters(capsys):
    """config.json alone: planned on the meta device; the tokenizer transformers builds from it has no
    vocabulary, so the data is not tokenized (and not wrongly found empty)."""
    from launcher.cli import main

    job_file = str(PLANS / "qwen3-30b-a3b-lora-80gb.yaml")
    assert main(["plan", job_file]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table's wrapped cells, joined
    assert "│ experts │ 128 a layer, 8 routed per token: 3,429,414,912 parameters active per token (10.9%)" in out
    assert "memory holds all 31,528,630,272" in out
    assert "not tokenized: no tokenizer loads from" in out
    assert main(["plan", job_file, "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params == {"total": 31_528_630_272, "trainable": 996_507_648, "frozen": 30_532_122_624,
                      "active": 3_429_414_912, "experts": 128, "experts_per_token": 8}  # fmt: skip


def test_a_lora_setting_peft_refuses_on_experts_is_refused_before_launch(capsys):
    """PEFT's adapters on 3D expert weights take no dropout: planning builds them, so the job exits 2 with
    the reason instead of a rank's traceback."""
    from launcher.cli import main

    assert main(["plan", str(PLANS / "mixtral-8x7b-lora-80gb.yaml"), "--set", "finetune.dropout=0.05"]) == 2
    err = capsys.readouterr().err
    assert "error: finetune.dropout: 0.05 with LoRA on the experts: PEFT cannot apply dropout to them" in err
    assert "Traceback" not in err
    assert "set finetune.dropout: 0" in err
