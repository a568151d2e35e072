"""The planner tests' job: a small JobSpec on the shipped data, any section overridden."""

from __future__ import annotations

from pathlib import Path

from launcher.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]
ALPACA = REPO / "examples" / "data" / "alpaca_tiny.jsonl"


def job(model_path: str | Path, **sections) -> JobSpec:
    raw = {
        "name": "planner-test",
        "model": {"path": str(model_path)},
        "data": {"train": [{"path": str(ALPACA)}], "max_length": 64},
        "train": {"micro_batch_size": 1, "global_batch_size": 2},
        "strategy": {"name": "single"},
        "device": "cpu",
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(raw)
