"""The planner on a grpo job: the generation batch's KV cache and decode logits against a real DynamicCache,
the frozen reference per rank (sharded or whole), the reward models against their real parameter count, and
a grpo step planned above the same sizes as SFT."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.planner_job import REPO, job

from launcher.candidates import estimate
from launcher.errors import UserError
from launcher.planner import build_plan
from launcher.shapes import activation_phases, count_parameters
from strategies import footprint
from strategies.footprint.counts import Setting

PROMPTS = REPO / "tests" / "fixtures" / "good_jobs" / "data" / "prompts.jsonl"
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip
MAX_LENGTH, COMPLETION, GLOBAL = 12, 5, 4


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("policy")
    LlamaConfig(**SHAPE).save_pretrained(path)
    return path


def grpo(model: Path, finetune: str = "full", beta: float = 0.0, rewards: list[dict] | None = None, **sections):
    method = {"kind": "grpo", "num_generations": 2, "max_completion_length": COMPLETION, "beta": beta,
              "rewards": rewards or [{"function": "rewards.py:correct"}]}  # fmt: skip
    return job(
        model,
        model={"dtype": "fp32", "cpu_matmul": "aten"},
        finetune={"type": finetune},
        method=method,
        data={"train": [{"path": str(PROMPTS), "format": "prompt"}], "max_length": MAX_LENGTH},
        train={"global_batch_size": GLOBAL, "micro_batch_size": 2},
        **sections,
    )


def plan(spec, tmp_path: Path):
    return build_plan(spec, tmp_path / "run", device="cpu")[0]


def on_ranks(spec, strategy: str, ranks: int):
    return spec.model_copy(
        update={
            "strategy": spec.strategy.model_copy(update={"name": strategy}),
            "resources": spec.resources.model_copy(update={"gpus_per_node": ranks}),
        }
    )


def test_kv_cache_and_decode_logits_are_those_of_a_real_generation_batch(policy, tmp_path):
    """A rank's generation batch (global / ranks rows of max_length + max_completion_length) through a
    tiny Llama with transformers' DynamicCache, in fp32: the cache's K and V tensors are exactly the
    planned bytes, and the decode logits three copies of the last position's [rows, vocab] fp32."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    p = plan(grpo(policy), tmp_path)
    rows, length = GLOBAL, MAX_LENGTH + COMPLETION
    assert p.rollout["generation_batch"] == rows and p.rollout["row_length"] == length == 17
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE)
    model = LlamaForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    ids = torch.randint(0, SHAPE["vocab_size"], (rows, length))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the row keeps its positions in the cache
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, cache=cache, logits_to_keep=1)
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert len(held) == 2 * SHAPE["num_hidden_layers"]
    real = sum(t.numel() * t.element_size() for t in held)
    # 4 rows x 17 positions x 2 layers x (K, V) x 2 kv heads x 16 head_dim x 4 bytes
    assert real == 4 * 17 * 2 * 2 * 2 * 16 * 4 == 34_816
    assert p.rollout["kv_cache_bytes"] == real
    last = out.logits[:, -1, :].float()
    assert tuple(out.logits.shape) == (rows, 1, SHAPE["vocab_size"])
    assert p.rollout["decode_logits_bytes"] == 3 * last.numel() * last.element_size() == 6_144


def test_the_frozen_reference_is_whole_on_each_rank_or_sharded_as_the_policy(policy, tmp_path):
    """beta > 0 with full fine-tuning: a frozen fp32 copy (this job's compute dtype) of every parameter;
    single and ddp hold all of it, fsdp and zero3 on 2 ranks about half (every dim here is even: exactly
    half for fsdp; zero3 also keeps its small tensors whole). beta 0: none, and the plan is smaller by it."""
    numel = count_parameters(grpo(policy)).total
    assert numel == 107_328
    whole = plan(grpo(policy, beta=0.1), tmp_path)
    assert whole.reference["source"] == "frozen_copy"
    assert whole.reference["memory_bytes_per_rank"] == whole.rollout["reference_bytes"] == 4 * numel
    held = {}
    for strategy in ("ddp", "fsdp", "zero3"):
        p = plan(on_ranks(grpo(policy, beta=0.1), strategy, 2), tmp_path)
        held[strategy] = p.reference["memory_bytes_per_rank"]
        none = plan(on_ranks(grpo(policy), strategy, 2), tmp_path)
        assert none.reference is None and none.rollout["reference_bytes"] == 0
        assert p.chosen["bytes_per_rank"]["total"] - none.chosen["bytes_per_rank"]["total"] == held[strategy]
    assert held["ddp"] == 4 * numel
    assert held["fsdp"] == 4 * numel // 2 == 214_656
    assert 4 * numel // 2 < held["zero3"] < 0.55 * 4 * numel  # + the norms and small tensors kept whole


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_an_adapter_job_s_reference_is_its_adapter_switched_off(policy, tmp_path, finetune):
    if finetune == "qlora":
        pytest.importorskip("bitsandbytes")
    with_kl, without = plan(grpo(policy, finetune, beta=0.1), tmp_path), plan(grpo(policy, finetune), tmp_path)
    assert with_kl.reference["source"] == "adapter_disabled"
    assert with_kl.reference["memory_bytes_per_rank"] == with_kl.rollout["reference_bytes"] == 0
    assert without.reference is None
    assert with_kl.chosen["bytes_per_rank"] == without.chosen["bytes_per_rank"]


def test_reward_models_are_counted_whole_on_every_rank(policy, tmp_path):
    """Two sequence-classification reward models of other shapes, saved here: their real parameter count
    (with the one-unit score head) in the compute dtype, on each rank whatever the strategy."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    numels = []
    for i, hidden in enumerate((32, 48)):
        config = LlamaConfig(**{**SHAPE, "hidden_size": hidden, "intermediate_size": 2 * hidden}, num_labels=1)
        model = LlamaForSequenceClassification(config)
        model.save_pretrained(tmp_path / f"reward{i}")
        numels.append(sum(t.numel() for t in model.parameters()))
    assert numels == [22_720, 47_904]
    rewards = [{"model": str(tmp_path / "reward0")}, {"function": "rewards.py:short"},
               {"model": str(tmp_path / "reward1"), "weight": 0.5}]  # fmt: skip
    for strategy, ranks in (("single", 1), ("fsdp", 2)):
        scored = plan(on_ranks(grpo(policy, rewards=rewards), strategy, ranks), tmp_path)
        functions = plan(on_ranks(grpo(policy), strategy, ranks), tmp_path)
        assert scored.rollout["reward_model_bytes"] == 4 * sum(numels) == 282_496
        b, f = scored.chosen["bytes_per_rank"], functions.chosen["bytes_per_rank"]
        assert b["frozen_models"] == 4 * sum(numels) and b["total"] - f["total"] == 4 * sum(numels)


def test_an_unreadable_reward_model_config_names_its_field(policy, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")  # no model_type: transformers cannot build it
    rewards = [{"function": "rewards.py:correct"}, {"model": str(tmp_path / "broken")}]
    with pytest.raises(UserError) as info:
        plan(grpo(policy, rewards=rewards), tmp_path)
    assert str(info.value).startswith(f"method.rewards.1.model: cannot read a model config from '{tmp_path}/broken'")


def test_activations_are_those_of_prompt_plus_completion_rows_with_completion_logits():
    """grpo's layers see rows of max_length + max_completion_length tokens (as SFT's of that length); its
    loss takes the vocabulary's log-softmax at the completion positions only (12 bytes x vocab each)."""
    counts = count_parameters(grpo(REPO / "examples" / "configs" / "llama3-8b"))
    base = Setting(strategy="fsdp", compute_dtype="bf16", micro_batch_size=2, device="cuda")
    as_grpo = replace(base, method="grpo", max_length=1024, completion_length=256)
    as_sft = replace(base, max_length=1024 + 256)
    (g_loss, g_layers), _ = activation_phases(counts, as_grpo)
    (s_loss, s_layers), _ = activation_phases(counts, as_sft)
    assert g_layers == s_layers
    assert s_loss - g_loss == 12 * 2 * 1024 * 128_256  # the prompt positions' loss is not counted


def test_a_grpo_step_plans_more_than_the_same_sizes_as_sft(tmp_path):
    """Llama-3-8B, full, beta 0.04, on 8 x 64 GB: one rank's 8 completions of 1024 + 256 tokens. Its
    generation phase holds the state, the reference and the KV cache; its training phases the reference
    besides SFT's of rows that long. auto: SFT fits zero1 (50.7 GiB); grpo's whole 15 GiB reference does
    not (64.2 GiB), so it moves to zero2."""
    config = REPO / "examples" / "configs" / "llama3-8b"
    sizes = {"model": {"dtype": "bf16"}, "finetune": {"type": "full"}, "strategy": {"name": "auto"},
             "resources": {"gpus_per_node": 8, "gpu_memory_gb": 64}, "cluster": {"kind": "slurm"},
             "device": "cuda", "train": {"global_batch_size": 64, "micro_batch_size": 1}}  # fmt: skip
    counts = count_parameters(job(config, finetune={"type": "full"}))
    method = {"kind": "grpo", "beta": 0.04, "max_completion_length": 256, "rewards": [{"function": "r.py:f"}]}
    data = {"train": [{"path": str(PROMPTS), "format": "prompt"}], "max_length": 1024}
    as_grpo = build_plan(job(config, **sizes, method=method, data=data), tmp_path, counts=counts)[0]
    as_sft = build_plan(job(config, **sizes, data={"max_length": 1024 + 256}), tmp_path, counts=counts)[0]
    assert (as_sft.strategy, as_grpo.strategy) == ("zero1", "zero2")
    zero1 = [c for c in as_grpo.candidates if (c["strategy"], c["offload"]) == ("zero1", "none")][0]
    assert not zero1["fits"] and zero1["bytes_per_rank"]["frozen_models"] == 2 * counts.total
    r = as_grpo.rollout
    assert r["generation_batch"] == 8 and r["row_length"] == 1280
    # 8 rows x 1280 positions x 32 layers x (K, V) x 8 kv heads x 128 head_dim x 2 bytes (bf16)
    assert r["kv_cache_bytes"] == 8 * 1280 * 32 * 2 * 8 * 128 * 2 == 1_342_177_280
    assert r["decode_logits_bytes"] == 3 * 8 * 128_256 * 4
    # the chosen strategy for both: grpo's training peak is SFT's (rows as long) + the reference - the
    # prompt positions' logits; its generation holds the state, the reference, the KV cache and the logits
    s = Setting(strategy="zero2", world_size=8, compute_dtype="bf16", max_length=1280, device="cuda")
    sft = estimate(counts, s)[0]
    g = estimate(counts, replace(s, method="grpo", max_length=1024, completion_length=256, generation_rows=8,
                                 frozen_copy=True))[0]  # fmt: skip
    assert r["reference_bytes"] == footprint("zero2").frozen_copy_bytes(counts, s) == 2 * counts.total
    assert g.backward - sft.backward == 2 * counts.total - 12 * 1024 * 128_256
    held_state = g.params + g.optimizer + 2 * counts.total
    assert g.generation == held_state + g.grads + g.buffers + r["kv_cache_bytes"] + r["decode_logits_bytes"]
    assert g.total > sft.total and as_grpo.chosen["bytes_per_rank"]["total"] == g.total
    # zero3 partitions the reference as the module: an eighth of it, and its small tensors whole
    sharded = footprint("zero3").frozen_copy_bytes(counts, replace(s, strategy="zero3"))
    assert 2 * counts.total / 8 < sharded < 1.01 * 2 * counts.total / 8


def test_sharpen_plan_prints_the_rollout(policy, tmp_path, capsys):
    from launcher.report import print_plan

    print_plan(plan(grpo(policy, beta=0.1), tmp_path))
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "4 completions a rank generated as one batch of up to 17 tokens: KV cache 34.00 KiB" in out
    assert "decode logits 6.00 KiB, reference 419.25 KiB, reward models 0 B" in out  # 4 x 107,328 bytes
    assert "global 4 samples of up to 17 tokens" in out


def test_generation_gathers_the_whole_model_once_where_it_fits(policy, tmp_path: Path):
    """fsdp and zero3 shard parameters: a rollout gathers them once (the whole model in the compute dtype
    beside the generation peak) when that fits, else per forward; ddp holds them whole already."""
    from launcher.candidates import generation_gather, setting_for

    spec = grpo(policy)
    whole = 4 * count_parameters(spec).total  # fp32
    for strategy, want in (("fsdp", "rollout"), ("zero3", "rollout"), ("ddp", "none"), ("zero2", "none")):
        planned = plan(on_ranks(spec, strategy, 2), tmp_path).rollout
        assert planned["gather"] == want, (strategy, planned)
        assert planned["gathered_bytes"] == (whole if want == "rollout" else 0)
    asked = spec.model_copy(update={"method": spec.method.model_copy(update={"generation_gather": "forward"})})
    assert plan(on_ranks(asked, "fsdp", 2), tmp_path).rollout["gather"] == "forward"

    counts = count_parameters(spec)
    s = setting_for(on_ranks(spec, "fsdp", 2), "fsdp", "none", 2, "cpu", "fp32", 2, 1)
    peak = 10_000_000
    assert generation_gather(counts, s, peak + whole, peak)["gather"] == "rollout"
    assert generation_gather(counts, s, peak + whole - 1, peak)["gather"] == "forward"
    assert generation_gather(counts, s, peak + whole - 1, peak, "rollout")["gather"] == "rollout"
    assert not generation_gather(counts, s, None, peak)["merge_lora"]  # full fine-tuning: no adapter


def test_lora_is_merged_for_generation_where_the_copies_fit(policy, tmp_path: Path):
    """The merged copies: every frozen linear weight in the compute dtype (an upper bound), only where the
    parameters are whole during generation and the copies fit."""
    from launcher.candidates import generation_gather, setting_for

    spec = grpo(policy, "lora")
    counts = count_parameters(spec)
    linears = 4 * sum(t.numel for t in counts.tensors if t.matmul and not t.trainable)
    planned = plan(spec, tmp_path).rollout
    assert planned["merge_lora"] and planned["merged_lora_bytes"] == linears > 0
    s = setting_for(spec, "single", "none", 1, "cpu", "fp32", 2, 2)
    peak = 10_000_000
    assert generation_gather(counts, s, peak + linears, peak)["merge_lora"]
    assert not generation_gather(counts, s, peak + linears - 1, peak)["merge_lora"]
    forward = spec.model_copy(update={"method": spec.method.model_copy(update={"generation_gather": "forward"})})
    assert not plan(on_ranks(forward, "fsdp", 2), tmp_path).rollout["merge_lora"]  # sharded while generating
