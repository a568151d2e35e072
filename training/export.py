"""Writing a trained model in Hugging Face format: a PEFT adapter dir, or full safetensors weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from strategies.base import Strategy


def write_final(strategy: Strategy, tokenizer, out_dir: Path, peft: bool) -> None:
    """Gather the weights (a collective: every rank calls it) and write them on rank 0, atomically.

    For LoRA/QLoRA only the adapter is gathered and saved (loadable by PeftModel.from_pretrained); for
    full fine-tuning the full weights (gathered from ZeRO-3 / FSDP shards) with config and tokenizer."""
    state = strategy.full_state_dict(trainable_only=peft)
    if not strategy.env.is_main:
        return
    assert state is not None
    model = strategy.unwrap()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A PeftModel keeps only the adapter's entries of `state`; a transformers model writes them all.
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_probe_logits(strategy: Strategy, path: str, vocab_size: int) -> None:
    """The trained model's logits on a fixed input, saved by rank 0 (a collective under FSDP/ZeRO-3).

    Tests set SHARPEN_PROBE_LOGITS=FILE to check that final/ reproduces the model as it was trained."""
    import torch

    input_ids = (torch.arange(1, 17) % vocab_size).unsqueeze(0)
    model = strategy.model
    model.eval()
    with torch.no_grad(), strategy.forward_context():
        logits = model(input_ids=input_ids.to(strategy.env.device)).logits.float().cpu()
    if strategy.env.is_main:
        torch.save({"input_ids": input_ids, "logits": logits}, path)
