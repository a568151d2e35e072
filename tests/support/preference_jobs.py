"""The DPO and reward tests' tiny model (its tokenizer knows the preference data) and their jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.e2e import EXAMPLES, base_job
from training.data.formats import ALPACA_PROMPT_WITH_INPUT

# Separable: every rejected answer is hedged ("Maybe ..."), and wrong (examples/make_dataset.py).
PREFS = EXAMPLES / "data" / "preference_tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, [ALPACA_PROMPT_WITH_INPUT] * 20 + corpus_from_jsonl(PREFS), vocab_size=512)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def dpo_job(model: Path, cache: Path, finetune: str, strategy: str, ranks: int) -> dict:
    return base_job(
        model,
        PREFS,
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={"kind": "dpo", "beta": 0.5},
        data={
            "train": [{"path": str(PREFS), "format": "preference"}],
            "max_length": 96,
            "eval_split": 0.05,
            "cache_dir": str(cache),
        },
        train={"max_steps": 6, "lr": 5.0e-3, "save_every": 2, "eval_every": 3},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )


# The reward job's optimizer steps.
STEPS = 6


def reward_job(
    model: Path, cache: Path, finetune: str = "full", strategy: str = "single", ranks: int = 1
) -> dict:
    return base_job(
        model,
        PREFS,
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={"kind": "reward"},
        data={
            "train": [{"path": str(PREFS), "format": "preference"}],
            "max_length": 96,
            "eval_split": 0.05,
            "cache_dir": str(cache),
        },
        train={"max_steps": STEPS, "lr": 2.0e-3, "save_every": 2, "eval_every": 3},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )


def alone(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(sum of log p(label), label count) of one sequence run by itself, in float64: the reference the
    padding-free losses are checked against."""
    import torch

    from training.data.packing import IGNORE_INDEX

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    picked = [logps[i, t].item() for i, t in enumerate(labels) if t != IGNORE_INDEX]
    return sum(picked), len(picked)
