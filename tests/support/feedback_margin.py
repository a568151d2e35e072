"""The reward-free sanity number of the KTO tests: a model's log-probability margin on held-out preference pairs."""

from __future__ import annotations

from pathlib import Path

import torch

from support.feedback_jobs import HELD_OUT, preference_records


def held_out_margin(model_dir: Path, tokenizer_dir: Path) -> float:
    """Mean over the held-out pairs of log p(chosen | prompt) − log p(rejected | prompt), in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def logp(prompt: str, answer: str) -> float:
        start = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float(picked[start - 1 :].sum())

    pairs = preference_records()[-HELD_OUT:]
    return sum(logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs) / len(pairs)
