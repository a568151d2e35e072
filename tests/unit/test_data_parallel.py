"""Tokenizing in data.num_proc processes (training/data/prepare.py): exactly the cache one process writes,
its statistics included, and a second prepare of the same data is a cache hit that encodes nothing."""

from __future__ import annotations

import json

import pytest
from support.data_inputs import write_jsonl

from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D


def records(n: int) -> list[dict]:
    """Mixed lengths, some longer than max_length 64, some with nothing to learn from (dropped)."""
    words = ["owl", "cat", "dog", "sum", "list", "hello", "Ada"]
    out = []
    for i in range(n):
        output = "" if i % 97 == 0 else " ".join(words[(i + k) % 7] for k in range(i % 23))
        out.append({"instruction": f"Say {words[i % 7]} {i}.", "input": str(i) if i % 3 else "", "output": output})
    return out


def test_two_processes_write_the_cache_one_writes(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(2 * D.MIN_RECORDS_PER_PROC + 123))
    assert D.processes_for(2 * D.MIN_RECORDS_PER_PROC + 123, 2) == 2

    def prepare(num_proc: int, root: str):
        spec = DataSpec(train=[{"path": str(path)}], max_length=64, truncation="drop", num_proc=num_proc)
        return D.prepare_dataset(spec, "sft", str(tiny_model), cache_root=tmp_path / root)

    serial, parallel = prepare(1, "one"), prepare(2, "two")
    a, b = C.load_prepared(serial), C.load_prepared(parallel)
    assert len(a) == len(b) > 1000
    for column in a.column_names:
        assert a[column] == b[column], column
    meta = [json.loads((p / C.META_FILE).read_text()) for p in (serial, parallel)]
    assert meta[0]["stats"] == meta[1]["stats"] and meta[0]["stats"]["dropped_no_labels"] > 0
    assert meta[0]["stats"]["dropped_too_long"] > 0 and meta[0]["sources"] == meta[1]["sources"]

    builds = C.builds_in_this_process
    again = prepare(2, "two")  # num_proc changes nothing the cache holds: the same entry, not encoded again
    assert again == parallel and C.builds_in_this_process == builds


@pytest.mark.parametrize(("records_", "num_proc", "expected"), [(100, 8, 1), (5000, None, 1), (9000, 3, 3)])
def test_small_files_are_tokenized_in_fewer_processes(records_, num_proc, expected, monkeypatch):
    monkeypatch.setattr(D, "available_cores", lambda: 1)
    assert D.processes_for(records_, num_proc) == expected
