"""training/fused_loss.py: the loss through a frozen output projection in chunks gives the loss and every
gradient of the plain one (logits, fp32 cross-entropy, autograd), and keeps no logits for the backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support.memory import saved_storage_bytes
from test_attention import LENGTHS, tiny_llama
from test_last_layer import completion_rows

from training.data.packing import collate
from training.kernels import fused_loss
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.kernels.fused_loss import fuse_frozen_head_loss, fuses_frozen_head_loss
from training.kernels.last_layer import prune_last_layer
from training.methods.causal_lm import CausalLMLoss


def lora_llama(dropout: float = 0.0):
    torch.manual_seed(0)
    model = tiny_llama(layers=2).train()
    model.config._attn_implementation = kernel_name("sdpa")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: give the adapters a say in the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def loss_and_grads(model, batch, seed: int = 1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = CausalLMLoss()(model, batch).loss_sum
    (loss * 0.37).backward()  # a scale, as the loop's 1/label tokens: the backward must apply it
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_free", [True, False])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_gives_the_loss_and_gradients_of_the_plain_loss(padding_free, pruned, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 96 * 5)  # 5 tokens a chunk: several chunks and a short one
    plain = lora_llama(dropout=0.1)
    if pruned:
        prune_last_layer(plain)
    fused = copy.deepcopy(plain)
    assert fuse_frozen_head_loss(fused) and fuses_frozen_head_loss(fused) and not fuses_frozen_head_loss(plain)
    rows = completion_rows(LENGTHS)
    rows[0]["labels"][-3:] = [-100] * 3  # ignored positions among the label columns of a padded batch
    batch = collate(rows, padding_free=padding_free, attention=PER_SAMPLE_SDPA if padding_free else "sdpa")
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-5)
    assert sorted(grads_b) == sorted(grads_a) and len(grads_a) == 2 * 7 * 2  # A and B of 7 linears, 2 layers
    for name in grads_a:
        atol = 2e-6 * float(grads_a[name].abs().max())  # fp32 rounding: another order of the same sums
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=atol, msg=name)


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
