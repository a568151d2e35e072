"""The kernel tests' inputs: a tiny random model of each family (training/tiny.py's, built in memory; a
LoRA one), packed rows of given lengths (one segment a sample), a step's loss and gradients, and the CPU
matmul engines to run them on."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from training.kernels.attention import kernel_name
from training.kernels.cpu_gemm import onednn_available
from training.methods.causal_lm import CausalLMLoss

# Two pairs of equal lengths (batched sdpa calls), a one-token sample, and distinct ones (a call each).
LENGTHS = [7, 12, 7, 1, 20, 12, 5]


def tiny_family(family: str, layers: int = 2, **fields):
    """A random tiny model of `family` (a key of training.tiny.FAMILIES) for 96-token ids, in memory."""
    from transformers import AutoModelForCausalLM

    from training.tiny import tiny_config

    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the ids rows leave out (3 to 95)
    config = tiny_config(family, vocab_size=96, num_layers=layers, max_position_embeddings=128, **tokens, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_llama(layers: int = 2):
    return tiny_family("llama", layers)


def packed_rows(lengths: list[int]) -> list[dict]:
    """One stored row per sample, so collate lays them end to end as separate segments."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [*ids[1:], -100], "segment_lengths": [n]})
    return rows


def completion_rows(lengths: list[int]) -> list[dict]:
    """Samples whose labels cover only the last third (a completion), as SFT's are."""
    rows = packed_rows(lengths)
    for row in rows:
        n = len(row["labels"])
        row["labels"] = [-100] * (n - n // 3) + row["labels"][n - n // 3 :]
    return rows


def lora_llama(dropout: float = 0.0):
    return lora_family("llama", dropout)


def lora_family(family: str, dropout: float = 0.0, **fields):
    """tiny_family's model with LoRA on every linear layer (B random: the adapters change the outputs),
    on the per-sample sdpa kernel; `fields` are further config fields."""
    torch.manual_seed(0)
    model = tiny_family(family, layers=2, **fields).train()
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


ENGINES = [False, pytest.param(True, marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN"))]
