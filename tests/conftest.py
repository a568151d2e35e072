"""Fixtures shared by the end-to-end test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e import ALPACA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer is trained on the shipped alpaca data, built once per test run."""
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, corpus_from_jsonl(ALPACA), vocab_size=512)
    return out
