"""What every test may use (the tiny model), and the markers a test's directory gives it."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import ALPACA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer is trained on the shipped alpaca data, built once per test run."""
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, corpus_from_jsonl(ALPACA), vocab_size=512)
    return out


TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items) -> None:
    """The directory says what a test costs: tests/ranks and tests/slurm are `slow`, tests/slurm also `slurm`."""
    for item in items:
        where = item.path.parts[len(TESTS.parts)] if item.path.is_relative_to(TESTS) else ""
        if where in ("ranks", "slurm"):
            item.add_marker(pytest.mark.slow)
        if where == "slurm":
            item.add_marker(pytest.mark.slurm)
