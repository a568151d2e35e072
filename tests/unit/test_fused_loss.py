"""training/kernels/fused_loss.py: the loss through a frozen output projection in chunks gives the loss and every
gradient of the plain one (logits, fp32 cross-entropy, autograd) for every family it supports, Gemma's final
soft-capping included, and keeps no logits for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
from support.kernel_inputs import (
    LENGTHS,
    completion_rows,
    lora_family,
    lora_llama,
    loss_and_grads,
    tiny_llama,
)
from support.memory import saved_storage_bytes

from training.data.packing import collate
from training.kernels import fused_loss
from training.kernels.attention import PER_SAMPLE_SDPA
from training.kernels.fused_loss import fuse_frozen_head_loss, fuses_frozen_head_loss
from training.kernels.last_layer import prune_last_layer
from training.methods.causal_lm import CausalLMLoss

# Gemma 3's final soft-capping, low enough to change a tiny random model's logits (tanh far from linear).
SOFTCAP = {"final_logit_softcapping": 0.1}
# (family, config fields, padding-free, last layer pruned): Llama in every combination, each other family the
# fused loss supports padding-free and padded (the pruned layer is Llama's alone); Gemma 3 with soft-capping.
CASES = [
    *(("llama", {}, padding_free, pruned) for padding_free in (True, False) for pruned in (False, True)),
    *((family, {}, padding_free, False) for family in ("mistral", "qwen2", "qwen3", "phi3", "gemma3")
      for padding_free in (True, False)),
    ("gemma3", SOFTCAP, True, False),
]


@pytest.mark.parametrize(("family", "fields", "padding_free", "pruned"), CASES)
def test_fused_gives_the_loss_and_gradients_of_the_plain_loss(family, fields, padding_free, pruned, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 96 * 5)  # 5 tokens a chunk: several chunks and a short one
    plain = lora_family(family, dropout=0.1, **fields)
    if pruned:
        assert prune_last_layer(plain)
    fused = copy.deepcopy(plain)
    assert fuse_frozen_head_loss(fused) and fuses_frozen_head_loss(fused) and not fuses_frozen_head_loss(plain)
    rows = completion_rows(LENGTHS)
    rows[0]["labels"][-3:] = [-100] * 3  # ignored positions among the label columns of a padded batch
    batch = collate(rows, padding_free=padding_free, attention=PER_SAMPLE_SDPA if padding_free else "sdpa")
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    adapters = sorted(name for name, p in plain.named_parameters() if p.requires_grad)
    assert sorted(grads_b) == sorted(grads_a) == adapters and len(adapters) >= 2 * 4 * 2  # A and B of each linear
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())  # fp32 rounding: another order of the same sums
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=atol, msg=name)


def test_the_soft_capped_case_is_capped():
    """SOFTCAP changes the tiny Gemma's loss and gradients well beyond the tolerances above: the soft-capped
    case proves the fused loss caps as the model does."""
    capped = lora_family("gemma3", **SOFTCAP)
    uncapped = copy.deepcopy(capped)
    uncapped.base_model.model.config.final_logit_softcapping = None
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(model, batch) for model in (capped, uncapped))
    assert abs(float(loss_a - loss_b)) > 1e-3 * float(loss_b)
    assert max(float((grads_a[n] - grads_b[n]).abs().max() / grads_b[n].abs().max()) for n in grads_b) > 0.1


def test_under_bf16_autocast_it_matches_the_plain_loss_to_bf16_rounding():
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    fuse_frozen_head_loss(fused)
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, grads_a = loss_and_grads(plain, batch)
        loss_b, grads_b = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-3, atol=0)
    for name in grads_a:
        scale = grads_a[name].abs().max()
        assert (grads_b[name] - grads_a[name]).abs().max() <= 2e-2 * scale, name


def test_no_logits_are_kept_for_the_backward():
    """The plain loss keeps the fp32 logits at every label position (and softmax's output); the fused one
    keeps the hidden states' gradient instead: [tokens, 64] for [tokens, 96] logits here, and 64 for 128k
    on a real model."""
    plain = lora_llama()
    fused = copy.deepcopy(plain)
    fuse_frozen_head_loss(fused)
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    labelled = int((batch.labels != -100).any(dim=0).sum())

    def kept(model) -> int:
        return saved_storage_bytes(lambda: CausalLMLoss()(model, batch), model.parameters())

    assert kept(fused) <= kept(plain) - labelled * 96 * 4 + labelled * 64 * 4


def test_a_trainable_head_keeps_the_plain_loss():
    model = tiny_llama(layers=1)  # a full fine-tune: lm_head.weight is trained
    assert not fuse_frozen_head_loss(model) and not fuses_frozen_head_loss(model)
    peft = lora_llama()
    assert fuse_frozen_head_loss(peft)
    peft.base_model.model.lm_head.weight.requires_grad_(True)  # unfrozen after the fact: still right
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    loss, grads = loss_and_grads(peft, batch)
    assert "base_model.model.lm_head.weight" in grads and torch.isfinite(loss)
