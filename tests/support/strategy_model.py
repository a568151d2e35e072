"""The strategy tests' tiny Llama, full or LoRA, the same on every rank and strategy."""

from __future__ import annotations

import pytest
import torch


def build_model(model_dir: str, finetune: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # LoRA A matrices are random: the same on every rank and strategy
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        )
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from training.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))
