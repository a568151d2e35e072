"""Mixture-of-experts models on their tiny copies: the router's load-balancing loss in causal_lm, with its
coefficient; LoRA targets that name the experts; the MoE blocks ZeRO-3 makes leaves."""

from __future__ import annotations

import pytest
import torch

from strategies.base import moe_block_classes
from training.data.packing import collate
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.methods.causal_lm import CausalLMLoss
from training.moe import config_is_moe, lora_targets, router_aux_coefficient
from training.tiny import FAMILIES, MOE_FAMILIES


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from training.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("moe")
    built = {}
    for family in (*MOE_FAMILIES, "llama"):
        path = build_tiny_model(root / family, family, vocab_size=300)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=kernel_name("sdpa"))
        built[family] = (path, model)
    return built


def rows(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in (7, 12, 5):
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        labels = ids[1:] + [-100]
        labels[0] = -100  # some positions without a label
        out.append({"input_ids": ids, "labels": labels, "segment_lengths": [n]})
    return out


def packed_batch(vocab: int, attention: str = "sdpa"):
    return collate(rows(vocab), padding_free=True, attention=attention)


def ce_and_aux(model, batch) -> tuple[float, float]:
    """The token CE sum and transformers' own aux_loss, from a forward that asks the model for it."""
    with torch.no_grad():
        out = model(**batch.model_inputs(), output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum"
        )
    return float(ce), float(out.aux_loss)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_loss_is_added_with_its_coefficient(models, family):
    """loss_sum = token CE sum + coefficient * aux * label tokens, aux being the aux_loss transformers'
    forward computes itself. The packed row comes with a 4D block mask here (sdpa on a GPU), which
    transformers' own aux computation cannot read: the reference runs the same row per sample."""
    _, model = models[family]
    config = model.config
    batch = packed_batch(config.vocab_size)
    assert batch.attention_mask is not None and batch.attention_mask.dim() == 4
    n_labels = int((batch.labels != -100).sum())
    ce, aux = ce_and_aux(model, packed_batch(config.vocab_size, PER_SAMPLE_SDPA))
    for coefficient in (0.0, 0.25):
        config.router_aux_loss_coef = coefficient
        assert router_aux_coefficient(model) == coefficient
        model.zero_grad()
        out = CausalLMLoss()(model, batch)
        out.loss_sum.backward()
        router_grad = next(p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
        assert float(out.metric_sums["router_aux_loss"]) == pytest.approx(aux * n_labels, rel=1e-5)
        assert float(out.loss_sum) == pytest.approx(ce + coefficient * aux * n_labels, rel=1e-5)
        if coefficient == 0:  # only the cross-entropy reaches the router: through the experts' weighting
            grad_without = router_grad.clone()
        else:
            assert not torch.allclose(router_grad, grad_without)


def test_router_loss_leaves_padding_out(models):
    """Padded rows: the aux loss averages over real tokens only, as transformers' does with a 2D mask."""
    _, model = models["mixtral"]
    model.config.router_aux_loss_coef = 0.1
    batch = collate(rows(model.config.vocab_size), padding_free=False, attention="sdpa")
    assert batch.padding_mask is not None and int(batch.padding_mask.sum()) == 7 + 12 + 5
    ce, aux = ce_and_aux(model, batch)
    out = CausalLMLoss()(model, batch)
    n_labels = int((batch.labels != -100).sum())
    assert float(out.loss_sum) == pytest.approx(ce + 0.1 * aux * n_labels, rel=1e-5)


def test_dense_models_have_no_router_loss(models):
    _, model = models["llama"]
    assert router_aux_coefficient(model) is None and not config_is_moe(model.config)
    out = CausalLMLoss()(model, packed_batch(model.config.vocab_size))
    assert out.metric_sums == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_families_are_moe_exactly_when_listed(family):
    import transformers

    config = getattr(transformers, FAMILIES[family][0])()
    assert config_is_moe(config) == (family in MOE_FAMILIES)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_targets_name_the_experts(models, family):
    _, model = models[family]
    assert lora_targets(model, "all-linear") == ("all-linear", [])
    modules, parameters = lora_targets(model, ["q_proj", "v_proj", "experts"])
    assert modules == ["q_proj", "v_proj"]
    assert parameters == ["experts.down_proj", "experts.gate_up_proj"]
    # one parameter by name; the dense models' MLP names stay modules where they are linear layers
    assert lora_targets(model, ["gate_up_proj"]) == ([], ["experts.gate_up_proj"])


def test_lora_on_experts_trains_every_expert_adapter(models):
    from peft import LoraConfig, get_peft_model

    path, _ = models["mixtral"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    modules, parameters = lora_targets(model, ["q_proj", "experts"])
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=modules, target_parameters=parameters))
    CausalLMLoss()(peft_model, packed_batch(model.config.vocab_size)).loss_sum.backward()
    expert_adapters = {n: p for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(expert_adapters) == 2 * 2 * model.config.num_hidden_layers  # A and B of two weights a layer
    assert all(p.grad is not None for n, p in expert_adapters.items() if "lora_B" in n)


def test_moe_blocks_are_found_for_zero3(models):
    names = {family: [c.__name__ for c in moe_block_classes(model)] for family, (_, model) in models.items()}
    assert names == {
        "mixtral": ["MixtralSparseMoeBlock"],
        "qwen3_moe": ["Qwen3MoeSparseMoeBlock"],
        "olmoe": ["OlmoeSparseMoeBlock"],
        "llama": [],
    }
