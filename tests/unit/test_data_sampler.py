"""The sampler (training/data/sampler.py): global batches the same on any number of ranks, epochs that
cover each row once, an exact restart at a step, and too few rows for one batch."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
import torch
from support import data_inputs
from support.data_inputs import ALPACA, EXAMPLES, prepared, write_jsonl

from launcher.errors import UserError
from training.data import sampler as S

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
model_dir = data_inputs.model_dir


# ---------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def alpaca_ds(model_dir, tmp_path_factory):
    return prepared(model_dir, tmp_path_factory.mktemp("cache"), EXAMPLES / "alpaca_tiny.jsonl", max_length=128)


def samples_of(step: S.StepBatch) -> list[tuple[int, ...]]:
    """The samples of a step batch, recovered from the rows by where position_ids restart."""
    out = []
    for mb in step.micro_batches:
        for ids, pos in zip(mb.input_ids.tolist(), mb.position_ids.tolist(), strict=True):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [tuple(ids[s:e]) for s, e in pairwise(starts)]
    return out


def global_batches(ds, world_size, grad_accum, steps, global_batch_size=8, **kw):
    micro = global_batch_size // (world_size * grad_accum)
    ranks = [
        S.step_batches(ds, global_batch_size=global_batch_size, micro_batch_size=micro, grad_accum=grad_accum,
                       rank=r, world_size=world_size, seed=3, **kw)
        for r in range(world_size)
    ]
    for _ in range(steps):
        parts = [next(it) for it in ranks]
        assert len({(p.global_label_tokens, p.global_tokens, p.global_samples, p.epoch) for p in parts}) == 1
        assert all(len(p.micro_batches) == grad_accum for p in parts)
        yield Counter(s for p in parts for s in samples_of(p)), parts[0]


def test_global_batches_are_world_size_invariant(alpaca_ds):
    runs = [list(global_batches(alpaca_ds, w, a, steps=6)) for w, a in [(1, 4), (2, 2), (4, 1)]]
    for k in range(6):
        assert runs[0][k][0] == runs[1][k][0] == runs[2][k][0]
        assert sum(runs[0][k][0].values()) == 8
        counts = {(r[k][1].global_label_tokens, r[k][1].global_tokens, r[k][1].global_samples) for r in runs}
        assert len(counts) == 1
    label_tokens = sum(
        mb.num_label_tokens for p in [runs[1][0][1]] for mb in p.micro_batches
    )
    assert 0 < label_tokens < runs[1][0][1].global_label_tokens  # one rank holds part of the step's labels


def test_epochs_cover_each_row_once_and_drop_the_partial_batch(model_dir, tmp_path):
    ds = prepared(model_dir, tmp_path / "c", EXAMPLES / "alpaca_tiny.jsonl").select(range(20))
    batches = list(global_batches(ds, 2, 1, steps=4, global_batch_size=8))
    assert [b.epoch for _, b in batches] == [0, 0, 1, 1]  # 20 rows: 2 steps per epoch, 4 rows left out
    epoch0 = batches[0][0] + batches[1][0]
    assert sum(epoch0.values()) == 16 and epoch0 <= Counter(map(tuple, ds["input_ids"]))
    assert batches[2][0] + batches[3][0] != epoch0  # a new permutation


def test_start_step_resumes_exactly(alpaca_ds):
    ds = alpaca_ds.select(range(100))  # 6 steps per epoch
    kw = dict(global_batch_size=16, micro_batch_size=4, grad_accum=2, rank=1, world_size=2, seed=7)
    start = 4  # the resumed range crosses an epoch boundary
    stream = S.step_batches(ds, **kw)
    for _ in range(start):
        next(stream)
    resumed = S.step_batches(ds, start_step=start, **kw)
    for _ in range(4):
        a, b = next(stream), next(resumed)
        assert (a.epoch, a.step, a.global_label_tokens, a.global_tokens) == (b.epoch, b.step, b.global_label_tokens, b.global_tokens)
        for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
            for name in ("input_ids", "position_ids", "labels", "attention_mask"):
                assert torch.equal(getattr(x, name), getattr(y, name))
    assert b.epoch == 1


def test_too_few_rows_for_one_global_batch(model_dir, tmp_path):
    ds = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA))
    with pytest.raises(UserError, match="3 rows, fewer than train.global_batch_size"):
        next(S.step_batches(ds, global_batch_size=4, micro_batch_size=1, grad_accum=4, rank=0, world_size=1, seed=0))
