"""The strategy tests' tiny Llama, full or LoRA, the same on every rank and strategy."""

from __future__ import annotations

import pytest
import torch


def build_model(
    model_dir: str, finetune: str, attn_implementation: str | None = None, lora_dropout: float = 0.0
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # LoRA A matrices are random: the same on every rank and strategy
    loading = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **loading)
    if attn_implementation is not None:
        model.config.use_cache = False
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules="all-linear")
        )
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from training.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
