"""What a method learns of a model once (training/methods/base.py PerModel) belongs to that model: not to
another built later at its freed address (the same id()), and it does not keep the model alive."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import torch
from torch import nn

from training.methods.base import PerModel
from training.methods.reward import RewardLoss


class Scorer(nn.Module):
    """A reward model's shape: a `score` head over every position, the last position's score pooled."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.score = nn.Linear(4, 1)

    def forward(self, input_ids):
        scores = self.score(self.embed(input_ids))
        return SimpleNamespace(logits=scores[:, -1])


def pair_batch():
    """One padding-free row of two sequences (a chosen and a rejected answer), 3 and 4 tokens."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    return SimpleNamespace(
        input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), num_samples=2,
        model_inputs=lambda: {"input_ids": ids},
    )


def test_a_model_built_at_a_freed_models_address_is_a_model_of_its_own(monkeypatch):
    """The reward loss hooks each model's score head the first time it sees the model. Keyed by id(), a
    second model allocated where the first was freed (so with its id) was taken for the first: never
    hooked, no scores. Where CPython reuses the address is up to its allocator, so the methods' id() is
    made to give every Scorer the same one here (the old code failed exactly so)."""
    from training.methods import reward

    monkeypatch.setattr(reward, "id", lambda obj: 1 if isinstance(obj, Scorer) else id(obj), raising=False)
    loss, batch = RewardLoss(), pair_batch()
    first = Scorer()
    loss.rewards(first, batch)
    del first
    second = Scorer()
    rewards, _ = loss.rewards(second, batch)
    with torch.no_grad():
        want = second.score(second.embed(batch.input_ids))[0, [2, 6], 0]  # each sequence's last token
    torch.testing.assert_close(rewards, want)


def test_what_is_kept_of_a_model_does_not_keep_it_alive():
    calls = []
    features = PerModel(lambda model: calls.append(1) or type(model).__name__)
    model = Scorer()
    assert features(model) == features(model) == "Scorer" and len(calls) == 1  # computed once
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
