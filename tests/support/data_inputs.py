"""The data tests' tiny model and inputs: the shipped example data, a JSONL writer, a prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.formats import ALPACA_PROMPT_WITH_INPUT
from training.tiny import build_tiny_llama, corpus_from_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
ALPACA = [
    {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "7"},
    {"instruction": "Say hello to Ada.", "input": "", "output": "Hello, Ada!"},
    {"instruction": "Reverse the list.", "input": "cat, dog, owl", "output": "owl, dog, cat"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    corpus = [t for f in sorted(EXAMPLES.glob("*.jsonl")) for t in corpus_from_jsonl(f)]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), corpus=[ALPACA_PROMPT_WITH_INPUT] * 20 + corpus)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared(model_dir, cache, path, fmt="alpaca", train_on="completion", **data):
    spec = DataSpec(train=[{"path": str(path), "format": fmt}], **data)
    kind = "pretrain" if fmt == "text" else "sft"
    return C.load_prepared(D.prepare_dataset(spec, kind, str(model_dir), cache_root=cache, train_on=train_on))
