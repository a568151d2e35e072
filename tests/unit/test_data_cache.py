"""The tokenize-once cache: a second call reads it, concurrent processes build it once, and the lock
of a builder that died is broken."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from support import data_inputs
from support.data_inputs import ALPACA, EXAMPLES, write_jsonl

from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
model_dir = data_inputs.model_dir


# ---------------------------------------------------------------- cache


def test_second_call_hits_the_cache(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    spec = DataSpec(train=[{"path": str(path), "format": "alpaca"}])
    before = C.builds_in_this_process
    first = D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c")
    stamp = (first / C.META_FILE).stat().st_mtime_ns
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c") == first
    assert C.builds_in_this_process == before + 1 and (first / C.META_FILE).stat().st_mtime_ns == stamp
    write_jsonl(path, ALPACA[:2])  # new contents: a new key
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c") != first
    longer = spec.model_copy(update={"max_length": 4096})
    assert D.prepare_dataset(longer, "sft", str(model_dir), cache_root=tmp_path / "c") != first
    assert C.builds_in_this_process == before + 3
    assert all(len(p.name) == 24 for p in (tmp_path / "c").iterdir())  # no lock, error or temp dir left


def _prepare_in_child(barrier, spec_json, model_dir, cache, results):
    from launcher.spec import DataSpec
    from training.data import cache as C
    from training.data import prepare as D

    barrier.wait()
    path = D.prepare_dataset(DataSpec.model_validate_json(spec_json), "sft", model_dir, cache_root=cache)
    results.put((str(path), C.builds_in_this_process))


def test_concurrent_processes_build_one_cache(model_dir, tmp_path):
    spec = DataSpec(train=[{"path": str(EXAMPLES / "alpaca_tiny.jsonl"), "format": "alpaca"}], max_length=100)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (barrier, spec.model_dump_json(), str(model_dir), str(tmp_path / "c"), results)
    procs = [ctx.Process(target=_prepare_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcome[0][0] == outcome[1][0]
    assert sorted(builds for _, builds in outcome) == [0, 1]
    assert [p.name for p in (tmp_path / "c").iterdir()] == [Path(outcome[0][0]).name]


def test_lock_of_a_dead_builder_is_broken(model_dir, tmp_path):
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "a.jsonl", ALPACA)), "format": "alpaca"}])
    key = C.cache_key(spec, "sft", str(model_dir), "completion", False)
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"{key}.lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c").name == key
