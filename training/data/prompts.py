"""Prompt data (format `prompt`, what grpo reads): the row the cache stores per prompt, and reading it back.

A row holds the prompt's token ids (BOS first, no EOS: generation continues them; no labels: nothing is
trained on a prompt), the prompt as the reward functions get it (a string, or chat messages), and the
record's other columns. Both of the latter are stored as JSON text, so string and message prompts, and
columns whose types differ between files (an int in one, a string in another, which Arrow cannot put in
one column), fit one stored schema. A key that a record lacks reads as None, as the file loader gives it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_COLUMNS = ("input_ids", "length", "prompt", "columns")


def prompt_features():
    """The stored schema of a prompt row: token ids as int32, the prompt and the other columns as JSON text."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32"), "prompt": text,
         "columns": text}
    )


def finish_prompt(ids: list[int], prompt: Any, columns: dict, max_length: int, truncation: str, stats: dict):
    """A prompt row's values (PROMPT_COLUMNS order), the ids cut to max_length (or None: dropped), as data.truncation says."""
    if len(ids) > max_length:
        if truncation == "drop":
            stats["dropped_too_long"] += 1
            return None
        ids = ids[:max_length]
        stats["truncated"] += 1
    return [ids, len(ids), json.dumps(prompt), json.dumps(columns, default=str)]


@dataclass(frozen=True)
class PromptSample:
    """One stored prompt as a rollout uses it: ids to generate from, the prompt and columns for the rewards."""

    input_ids: list[int]
    prompt: str | list[dict]
    columns: dict[str, Any]

    @property
    def is_chat(self) -> bool:
        """Chat messages (completions then reach the reward functions as messages too), not a string."""
        return isinstance(self.prompt, list)


def read_prompt(row: dict) -> PromptSample:
    """A stored prompt row (a dict of PROMPT_COLUMNS, as the dataset returns it) back as a PromptSample."""
    return PromptSample(list(row["input_ids"]), json.loads(row["prompt"]), json.loads(row["columns"]))


def data_columns(path: Path) -> list[str] | None:
    """The field names of a local data file's records, read from its start (None: not known without loading it)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), "{}")
            record = json.loads(line)
            return list(record) if isinstance(record, dict) else None
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return next(csv.reader(f), [])
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, StopIteration):
        return None  # unreadable here: the data checks say why
    return None
