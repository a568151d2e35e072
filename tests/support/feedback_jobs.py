"""The KTO tests' feedback data (the preference set split into thumbs-up and thumbs-down records) and jobs."""

from __future__ import annotations

import json
from pathlib import Path

from support.e2e import base_job
from support.preference_jobs import PREFS

HELD_OUT = 40  # the preference set's last pairs: never trained on, where the margin is measured


def preference_records() -> list[dict]:
    return [json.loads(line) for line in PREFS.read_text().splitlines() if line.strip()]


def write_feedback(path: Path, records: list[dict] | None = None) -> Path:
    """Each pair as two unpaired records, chosen → label true, rejected → label false (held-out pairs left out)."""
    pairs = preference_records()[:-HELD_OUT] if records is None else records
    lines = []
    for pair in pairs:
        lines.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        lines.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def kto_job(model: Path, cache: Path, data: Path, finetune: str, strategy: str, ranks: int, **method) -> dict:
    return base_job(
        model,
        data,
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={"kind": "kto", "beta": 0.5, **method},
        data={
            "train": [{"path": str(data), "format": "feedback"}],
            "max_length": 96,
            "eval_split": 0.05,
            "cache_dir": str(cache),
        },
        train={"max_steps": 6, "lr": 5.0e-3, "save_every": 2, "eval_every": 3},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )
