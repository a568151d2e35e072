"""Run dirs that several files of tests/ranks read, each trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import EXAMPLES, base_job, run_job

CHAT = EXAMPLES / "data" / "chat_tiny.jsonl"


@pytest.fixture(scope="session")
def trained_lora_run(tiny_model, tmp_path_factory) -> Path:
    """A finished LoRA SFT run as the demo trains one (adapters on every linear layer, lm_head and
    embed_tokens saved whole), 4 steps on chat data with model.chat_template chatml, one rank:
    RUN/final/ (adapter + tokenizer) and RUN/checkpoints/step-2, step-4."""
    job = base_job(
        tiny_model,
        CHAT,
        model={"path": str(tiny_model), "chat_template": "chatml"},
        finetune={"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear",
                  "modules_to_save": ["lm_head", "embed_tokens"]},
        data={"train": [{"path": str(CHAT), "format": "chat"}], "max_length": 128},
        train={"max_steps": 4, "save_every": 2, "lr": 5.0e-3},
    )
    run_dir, _ = run_job(tmp_path_factory.mktemp("after-training"), "lora", job)
    return run_dir
