"""The GRPO run tests' tiny model, prompts and job (reward functions: tests/fixtures/grpo/rewards.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from support.e2e import base_job

REWARDS = Path(__file__).resolve().parents[1] / "fixtures" / "grpo" / "rewards.py"
WORDS = ["apple", "river", "stone", "cloud", "green", "blue", "music", "light"]


def prompt_records(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Say a word: {' '.join(rng.sample(WORDS, 3))} ->", "target": rng.choice(WORDS)} for _ in range(n)]


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (256 tokens) and 64 prompts, built here; a data cache the module's runs share."""
    from training.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("grpo")
    records = prompt_records()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    rng = random.Random(1)
    corpus = [r["prompt"] for r in records] + [" ".join(rng.choices(WORDS, k=12)) for _ in range(200)]
    build_tiny_llama(root / "model", corpus, vocab_size=256)
    cache = root / "cache"
    return {"model": root / "model", "prompts": prompts, "cache": cache}


def grpo_job(inputs: dict[str, Path], finetune: str = "full", strategy: str = "single", ranks: int = 1,
             steps: int = 4, train: dict | None = None, **method) -> dict:
    """num_generations 4, 16 completions per step in micro-batches of 4, 16 new tokens each."""
    lr = 3.0e-3 if finetune == "full" else 2.0e-2
    return base_job(
        inputs["model"],
        inputs["prompts"],
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={
            "kind": "grpo",
            "num_generations": 4,
            "max_completion_length": 16,
            "rewards": [{"function": f"{REWARDS}:letters"}],
            **method,
        },
        data={"train": [{"path": str(inputs["prompts"]), "format": "prompt"}], "max_length": 64,
              "cache_dir": str(inputs["cache"])},
        train={"global_batch_size": 16, "micro_batch_size": 4, "max_steps": steps, "lr": lr, "seed": 0,
               **(train or {})},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )
