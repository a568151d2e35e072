"""Mixing data.train sources by weight (training/data/sampler.py's Mix): each source's share of the samples
drawn is its weight's share whatever the sources' sizes, the same draws on 1 and 2 ranks, a resume mid-mix
that continues them, no weights as today's one pool, and the refusals where rows are chosen before training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from support.data_inputs import write_jsonl
from support.planner_job import job

from launcher.errors import UserError
from launcher.planner import check_weights, data_sources
from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data import sampler as S

WEIGHTS = [3.0, 1.0, 2.0]
SIZES = (40, 10, 80)  # the shares are the weights' whatever the sizes


def source_records(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer " + "x " * (i % 7)} for i in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("sources")
    return [str(write_jsonl(d / f"{tag}.jsonl", source_records(tag, n))) for tag, n in zip("abc", SIZES, strict=True)]


def prepare(tiny_model, cache_root, paths, weights, **data):
    weights = weights or [None] * len(paths)
    spec = DataSpec(train=[{"path": p, "weight": w} for p, w in zip(paths, weights, strict=True)], max_length=64, **data)
    return D.prepare_dataset(spec, "sft", str(tiny_model), cache_root=cache_root)


@pytest.fixture(scope="module")
def mixed(tiny_model, sources, tmp_path_factory):
    cache = prepare(tiny_model, tmp_path_factory.mktemp("cache"), sources, WEIGHTS)
    return C.load_prepared(cache), S.prepared_mix(cache, WEIGHTS), cache


def steps(ds, mix, world_size, grad_accum, count, start_step=0, global_batch_size=8):
    micro = global_batch_size // (world_size * grad_accum)
    ranks = [
        S.step_batches(ds, global_batch_size=global_batch_size, micro_batch_size=micro, grad_accum=grad_accum,
                       rank=r, world_size=world_size, seed=5, mix=mix, start_step=start_step)
        for r in range(world_size)
    ]
    out = []
    for _ in range(count):
        parts = [next(it) for it in ranks]
        assert len({(p.global_tokens, p.global_label_tokens, p.global_samples, tuple(p.rows)) for p in parts}) == 1
        out.append((tuple(parts[0].rows.tolist()), Counter(s for p in parts for s in samples_of(p)), parts[0].global_tokens))
    return out


def samples_of(step: S.StepBatch) -> list[tuple[int, ...]]:
    """The samples of a step batch, recovered from its padding-free rows by where position_ids restart."""
    out = []
    for mb in step.micro_batches:
        for ids, pos in zip(mb.input_ids.tolist(), mb.position_ids.tolist(), strict=True):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    return out


def test_each_source_gets_its_share_over_1000_steps(mixed):
    ds, mix, cache = mixed
    bounds = np.cumsum([0, *mix.rows])
    drawn = np.zeros(len(WEIGHTS))
    for step in range(1000):  # the rows step_batches reads for each step (checked against it below)
        rows = mix.step_rows(step, 8, seed=5, shuffle=True)
        drawn += np.bincount(np.searchsorted(bounds, rows, side="right") - 1, minlength=len(WEIGHTS))
    share = drawn / drawn.sum()
    expected = np.asarray(WEIGHTS) / sum(WEIGHTS)
    assert np.all(np.abs(share - expected) <= 0.02 * expected), (share, expected)
    # 8000 draws: every source repeats, the small one most; the rows of a source each epoch once
    epochs = [s["epochs"] for s in data_sources(job("m", data={"train": [{"path": "x", "weight": w} for w in WEIGHTS]},
                                                    train={"max_steps": 1000, "global_batch_size": 8}), cache)]
    assert epochs == pytest.approx(8000 * expected / np.asarray(SIZES))
    assert epochs[1] > epochs[0] > epochs[2] > 1


def test_one_and_two_ranks_draw_the_same_samples_and_a_resume_continues_them(mixed):
    ds, mix, _ = mixed
    one = steps(ds, mix, world_size=1, grad_accum=4, count=12)
    two = steps(ds, mix, world_size=2, grad_accum=2, count=12)
    assert one == two
    assert steps(ds, mix, world_size=2, grad_accum=1, count=5, start_step=7) == one[7:]
    assert [rows for rows, _, _ in one] == [tuple(mix.step_rows(k, 8, 5, True).tolist()) for k in range(12)]
    assert len({rows for rows, _, _ in one}) == 12  # the steps differ from each other


def test_the_draws_are_a_function_of_the_step_alone():
    mix = S.Mix.of([7, 300, 1], [0.5, 0.02, 9.0])
    previous = [0, 0, 0]
    for slots in range(0, 400, 8):
        counts = mix.draws_before(slots)
        assert sum(counts) == slots and all(c >= p for c, p in zip(counts, previous, strict=True))
        previous = counts
    assert mix.draws_before(10**9) == pytest.approx([10**9 * s for s in mix.shares()], rel=1e-6)


def test_no_weights_are_todays_pool_and_equal_weights_are_equal_shares(tiny_model, sources, tmp_path):
    """No weights: the same cache entry and today's one shuffled pool, each source drawn by its size. Equal
    weights (2, 2, 2) are a mix of equal shares: a third each, though the sources hold 40, 10 and 80."""
    default = prepare(tiny_model, tmp_path, sources, None)
    assert prepare(tiny_model, tmp_path, sources, [2.0] * 3) == default  # weights do not change the tokens
    assert S.prepared_mix(default, [None] * 3) is None
    ds = C.load_prepared(default)
    got = [s.rows.tolist() for s, _ in zip(S.step_batches(ds, global_batch_size=8, micro_batch_size=8, grad_accum=1,
                                                            rank=0, world_size=1, seed=5), range(20), strict=False)]
    per_epoch = len(ds) // 8
    today = [S.epoch_order(len(ds), 5, k // per_epoch)[(k % per_epoch) * 8 : (k % per_epoch + 1) * 8].tolist()
             for k in range(20)]
    assert got == today
    equal = S.prepared_mix(default, [2.0] * 3)
    assert equal is not None and equal.shares() == pytest.approx([1 / 3] * 3)
    assert equal.draws_before(3000) == [1000, 1000, 1000]


def test_weights_on_some_sources_only_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"give every data.train source a weight, or none \(train.1 has none\)"):
        DataSpec(train=[{"path": "a.jsonl", "weight": 0.7}, {"path": "b.jsonl"}])
    with pytest.raises(ValidationError, match="evaluation files are not drawn"):
        DataSpec(train=[{"path": "a.jsonl"}], eval=[{"path": "e.jsonl", "weight": 1}])
    assert not S.mixing([3.0])  # one source: its weight has nothing to mix with


def test_packed_sources_are_packed_apart_when_weighted(tiny_model, sources, tmp_path):
    cache = prepare(tiny_model, tmp_path, sources, WEIGHTS, packing=True)
    prepared, ds = C.prepared_sources(cache), C.load_prepared(cache)
    assert sum(s["rows"] for s in prepared) == len(ds) and [s["samples"] for s in prepared] == list(SIZES)
    bounds = np.cumsum([0, *(s["rows"] for s in prepared)])
    segments = np.asarray(ds.with_format("arrow")["num_segments"])
    assert [int(segments[a:b].sum()) for a, b in zip(bounds, bounds[1:], strict=False)] == list(SIZES)
    pooled = C.prepared_sources(prepare(tiny_model, tmp_path, sources, None, packing=True))
    assert [s["rows"] for s in pooled] == [None] * 3  # one pool: a row may hold several sources


def test_weights_are_refused_where_rows_are_chosen_before_training():
    train = {"train": [{"path": "a.jsonl", "format": "preference", "weight": 1},
                       {"path": "b.jsonl", "format": "preference", "weight": 2}]}
    with pytest.raises(UserError, match=r"data\.train\[0\]\.weight: the sources are weighted \(1, 2\).*precomputed"):
        check_weights(job("m", data=train, method={"kind": "dpo"}, finetune={"type": "full"}))
    check_weights(job("m", data=train, method={"kind": "dpo"}, finetune={"type": "lora"}))  # reference: adapter off
    prompts = {"train": [{"path": "a.jsonl", "format": "prompt", "weight": 0.5},
                         {"path": "b.jsonl", "format": "prompt", "weight": 0.5}]}
    with pytest.raises(UserError, match=r"data\.train\[0\]\.weight.*grpo"):
        check_weights(job("m", data=prompts, method={"kind": "grpo", "rewards": [{"function": "rewards.py:f"}]},
                          train={"global_batch_size": 8}))
