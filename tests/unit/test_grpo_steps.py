"""The pieces of GRPO's step batches that need no model: the prompts of a step, a generation batch kept in a
checkpoint and re-sliced for another world size, the completions log after a resume, the data columns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.errors import UserError
from training.data.prompts import PromptSample
from training.data.sampler import step_prompts
from training.methods.grpo import CompletionCounts
from training.rollout.steps import Rollout, columns_of, truncate_completions


def test_the_prompts_of_a_step_cover_each_epoch_once_and_do_not_depend_on_anything_else():
    epochs = [step_prompts(10, 4, 7, True, step) for step in range(4)]  # 2 steps per epoch, 2 rows left over
    assert [e for e, _ in epochs] == [0, 0, 1, 1]
    first = np.concatenate([rows for e, rows in epochs if e == 0])
    assert len(set(first.tolist())) == 8 and all(0 <= r < 10 for r in first)
    assert np.array_equal(step_prompts(10, 4, 7, True, 3)[1], epochs[3][1])
    assert not np.array_equal(epochs[0][1], epochs[2][1])  # reshuffled in the second epoch
    assert step_prompts(10, 4, 7, False, 1)[1].tolist() == [4, 5, 6, 7]
    with pytest.raises(UserError, match="fewer than the 4 one step needs"):
        step_prompts(3, 4, 7, True, 0)


def rollout_share(rank: int, world: int, total: int = 8) -> Rollout:
    """Rank `rank`'s contiguous share of a batch of `total` completions numbered 0..total-1."""
    n = total // world
    ids = list(range(rank * n, (rank + 1) * n))
    return Rollout(
        index=3, epoch=1, prompt_ids=[[100 + i] for i in ids], completion_ids=[[i] * (i + 1) for i in ids],
        advantages=torch.tensor(ids, dtype=torch.float32), counts=CompletionCounts.of(range(1, total + 1), 16),
        global_tokens=99, metrics={"reward": 0.5}, old_logps=[torch.full((i + 1,), float(i)) for i in ids],
        ref_logps=None,
    )


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (2, 4), (4, 2), (1, 1)])
def test_a_saved_generation_batch_is_resliced_for_any_world_size(saved_on, resumed_on):
    states = [rollout_share(r, saved_on).state() for r in range(saved_on)]
    for rank in range(resumed_on):
        got, want = Rollout.from_states(states, rank, resumed_on), rollout_share(rank, resumed_on)
        assert (got.index, got.epoch, got.counts, got.global_tokens, got.metrics) == (3, 1, want.counts, 99, {"reward": 0.5})
        assert got.prompt_ids == want.prompt_ids and got.completion_ids == want.completion_ids
        assert torch.equal(got.advantages, want.advantages) and got.ref_logps is None
        assert all(torch.equal(a, b) for a, b in zip(got.old_logps, want.old_logps, strict=True))


def test_a_resume_drops_the_completions_of_later_steps(tmp_path: Path):
    path = tmp_path / "completions.jsonl"
    assert truncate_completions(path, 3) == 0 and not path.exists()
    path.write_text("".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 1, 2, 3, 4, 5)))
    assert truncate_completions(path, 3) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 1, 2, 3]


def test_every_completion_gets_every_column_and_none_where_its_record_lacks_one():
    samples = [PromptSample([1], "a", {"answer": "x"}), PromptSample([1], "b", {"answer": "y", "level": 2})]
    assert columns_of(samples) == {"answer": ["x", "y"], "level": [None, 2]}
