"""training/kernels/fused_loss.py: the loss through the output projection in chunks gives the loss and every
gradient of the plain one (logits, fp32 cross-entropy, autograd) for every family it supports, Gemma's final
soft-capping included, with the projection frozen (LoRA) or trained (full fine-tuning, tied embeddings
included), and keeps no logits for the backward."""

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
    packed_rows,
    tiny_family,
    tiny_llama,
)
from support.memory import saved_storage_bytes

from training.data.packing import collate
from training.kernels import fused_loss
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.kernels.fused_loss import fuse_head_loss, fuses_head_loss, head_loss_sum
from training.kernels.last_layer import prune_last_layer
from training.methods.causal_lm import CausalLMLoss
from training.tiny import FAMILIES, MOE_FAMILIES

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
    assert fuse_head_loss(fused) and fuses_head_loss(fused) and not fuses_head_loss(plain)
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
    fuse_head_loss(fused)
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
    fuse_head_loss(fused)
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    labelled = int((batch.labels != -100).any(dim=0).sum())

    def kept(model) -> int:
        return saved_storage_bytes(lambda: CausalLMLoss()(model, batch), model.parameters())

    assert kept(fused) <= kept(plain) - labelled * 96 * 4 + labelled * 64 * 4


def full_family(family: str, **fields):
    """tiny_family's model as a full fine-tune trains it: every weight, lm_head's (tied or not) among them."""
    model = tiny_family(family, layers=2, **fields).train()
    model.config._attn_implementation = kernel_name("sdpa")
    return model


TIED = ("qwen2", "gemma3")  # training/tiny.py ties their lm_head to embed_tokens
# Every dense family the fused loss supports, padding-free and padded, Gemma 3 soft-capped too; Llama pruned.
FULL_CASES = [
    *((family, {}, padding_free, False) for family in FAMILIES if family not in MOE_FAMILIES
      for padding_free in (True, False)),
    ("llama", {}, True, True),
    ("gemma3", SOFTCAP, True, False),
]


@pytest.mark.parametrize(("family", "fields", "padding_free", "pruned"), FULL_CASES)
def test_a_trained_head_gets_the_loss_and_gradients_of_the_plain_loss(family, fields, padding_free, pruned, monkeypatch):
    """Full fine-tuning: the head's weight gradient is summed over the chunks in the forward, and where it
    is tied to the embeddings, autograd adds the embedding's to it: every parameter's gradient as the plain
    loss's."""
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 96 * 5)  # 5 tokens a chunk: several chunks and a short one
    plain = full_family(family, **fields)
    if pruned:
        assert prune_last_layer(plain)
    fused = copy.deepcopy(plain)
    assert fuse_head_loss(fused) and fuses_head_loss(fused)
    tied = fused.lm_head.weight is fused.get_input_embeddings().weight
    assert tied == (family in TIED)
    rows = completion_rows(LENGTHS)
    rows[0]["labels"][-3:] = [-100] * 3
    batch = collate(rows, padding_free=padding_free, attention=PER_SAMPLE_SDPA if padding_free else "sdpa")
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    assert sorted(grads_b) == sorted(grads_a) == sorted(name for name, _ in plain.named_parameters())
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"  # a tied weight is named once
    token_ids = batch.model_inputs()["input_ids"].unique()
    unseen = torch.ones(grads_b[head].shape[0], dtype=torch.bool)
    unseen[token_ids] = False  # tied: rows no input token reads get the projection's gradient alone
    assert float(grads_b[head][unseen].abs().max()) > 1e-3 * float(grads_b[head].abs().max())
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())  # fp32 rounding: another order of the same sums
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=atol, msg=name)


def test_a_trained_head_and_bias_under_bf16_autocast_and_without_grad():
    """head_loss_sum on a Linear with a bias: the weight's and bias's gradients (fp32 sums of bf16 chunks
    under autocast) match autograd's to bf16 rounding, and exactly in fp32; under no_grad nothing is
    computed for a backward."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 96, bias=True)
    hidden = torch.randn(37, 64, requires_grad=True)
    labels = torch.randint(0, 96, (37,))
    labels[::5] = -100

    def grads(fused: bool, autocast: bool):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = head_loss_sum(hidden, head, labels)
            else:
                loss = torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
        (loss * 0.37).backward()
        return loss.detach(), [t.grad.clone() for t in (hidden, head.weight, head.bias)]

    for autocast, rtol in ((False, 1e-5), (True, 2e-2)):
        (loss_a, grads_a), (loss_b, grads_b) = grads(False, autocast), grads(True, autocast)
        torch.testing.assert_close(loss_b, loss_a, rtol=rtol / 10, atol=0)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert b.dtype == a.dtype == torch.float32
            assert (b - a).abs().max() <= rtol * a.abs().max()
    with torch.no_grad():
        loss = head_loss_sum(hidden, head, labels)
    assert loss.grad_fn is None


def test_under_bf16_autocast_a_trained_head_matches_the_plain_loss_to_bf16_rounding():
    plain = full_family("llama")
    fused = copy.deepcopy(plain)
    fuse_head_loss(fused)
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, grads_a = loss_and_grads(plain, batch)
        loss_b, grads_b = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-3, atol=0)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        scale = grads_a[name].abs().max()
        assert (grads_b[name] - grads_a[name]).abs().max() <= 2e-2 * scale, name


def test_no_logits_are_kept_for_the_backward_of_a_trained_head():
    """Full fine-tuning: the plain loss keeps cross-entropy's fp32 log-softmax at every label position
    ([tokens, 96] here, [tokens, 128k] on a real model) and the head's input; the fused one the hidden
    states' gradient and the head's weight gradient [96, 64] (which the plain backward makes too, and the
    step then holds as .grad)."""
    plain = full_family("llama")
    fused = copy.deepcopy(plain)
    fuse_head_loss(fused)
    batch = collate(packed_rows([60, 50, 40]), padding_free=True, attention=PER_SAMPLE_SDPA)
    labelled = int((batch.labels != -100).sum())

    def kept(model) -> int:
        return saved_storage_bytes(lambda: CausalLMLoss()(model, batch), model.parameters())

    assert labelled * 96 > 2 * 96 * 64  # enough label positions that the logits outweigh the head's gradient
    assert kept(fused) <= kept(plain) - labelled * 96 * 4 + labelled * 64 * 4 + 96 * 64 * 4


def test_a_head_unfrozen_after_fusing_gets_its_gradient():
    plain, fused = lora_llama(), lora_llama()
    assert fuse_head_loss(fused)
    for model in (plain, fused):
        model.base_model.model.lm_head.weight.requires_grad_(True)  # unfrozen after the fact: still right
    batch = collate(completion_rows(LENGTHS), padding_free=True, attention=PER_SAMPLE_SDPA)
    (loss_a, grads_a), (loss_b, grads_b) = (loss_and_grads(model, batch) for model in (plain, fused))
    assert "base_model.model.lm_head.weight" in grads_b and sorted(grads_a) == sorted(grads_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=atol, msg=name)
