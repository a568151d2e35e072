"""training/kernels/last_layer.py: the last layer's MLP at label positions gives the loss and gradients of the full
model, padding-free or padded, with gradient checkpointing, LoRA and the per-sample attention, for every family
whose decoder layer is Llama's."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from support.kernel_inputs import LENGTHS, completion_rows, tiny_family, tiny_llama
from torch import nn

from training.data.packing import collate
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.kernels.last_layer import SUPPORTED, prune_last_layer, prunes_last_layer
from training.methods.causal_lm import CausalLMLoss


def loss_and_grads(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss()(model, batch).loss_sum
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# (family, padding-free, checkpointing, LoRA): Llama in every combination; the other families whose layer is
# Llama's (Mistral, Qwen2 with its biases and tied head, Qwen3 with its q/k norms) on the two extremes.
CASES = [
    *(("llama", padding_free, checkpointing, lora)
      for padding_free in (True, False) for checkpointing in (False, True) for lora in (False, True)),
    *((family, *case) for family in ("mistral", "qwen2", "qwen3") for case in ((True, True, True), (False, False, False))),
]


@pytest.mark.parametrize(("family", "padding_free", "checkpointing", "lora"), CASES)
def test_pruned_last_layer_gives_the_same_loss_and_gradients(family, padding_free, checkpointing, lora):
    full = tiny_family(family, layers=3).train()
    full.config._attn_implementation = kernel_name("sdpa")
    if lora:
        full = get_peft_model(full, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():  # B starts at zero: give the adapters a say in the outputs
            for name, p in full.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    if checkpointing:
        full.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pruned = copy.deepcopy(full)
    assert prune_last_layer(pruned) and prunes_last_layer(pruned) and not prunes_last_layer(full)
    batch = collate(completion_rows(LENGTHS), padding_free=padding_free, attention=PER_SAMPLE_SDPA)
    calls = []
    last = [m for m in pruned.modules() if type(m).__name__ in SUPPORTED][-1]
    last.mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    loss_a, grads_a = loss_and_grads(full, batch)
    loss_b, grads_b = loss_and_grads(pruned, batch)
    columns = int((batch.labels != -100).any(dim=0).sum())
    assert calls and set(calls) == {columns} and columns < batch.labels.shape[1] / 2  # the MLP saw label positions
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_layers_and_other_callers_are_left_alone():
    """A model of other layers is not pruned; a pruned model called without positions is the full model."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    assert not prune_last_layer(Other())
    model = tiny_llama(layers=2).eval()
    pruned = copy.deepcopy(model)
    prune_last_layer(pruned)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, model(input_ids=ids).logits)
