"""Reward modelling: a scalar head on the base model, trained so chosen answers score above rejected ones.

The model is an AutoModelForSequenceClassification with one label (training/model.py). Its forward
scores every position and then keeps one score per row, which for a padding-free row of many
sequences would be the last sequence's only. So the per-token scores are taken from the head's own
output (a forward hook, inside the forward: FSDP and ZeRO-3 have the head's weights gathered there),
and each sequence's reward is read at its last token that is not the pad token: the token that
transformers' pooling picks when the exported model scores that sequence alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import LossOutput, PerModel
from training.methods.dpo import sequence_index


def sequence_ends(
    input_ids: torch.Tensor, position_ids: torch.Tensor, pad_token_id: int | None, count: int
) -> torch.Tensor:
    """[count] position of each sequence's last non-pad token in a padding-free [1, T] row."""
    sequences = sequence_index(position_ids)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    if pad_token_id is not None:
        positions = torch.where(input_ids[0] != pad_token_id, positions, -1)
    ends = torch.full((count,), -1, dtype=positions.dtype, device=positions.device)
    return ends.scatter_reduce(0, sequences, positions, reduce="amax")


def score_head(model: nn.Module) -> nn.Module:
    """The outermost module named `score` (transformers' classification head; PEFT's modules_to_save wrapper)."""
    found = [(name, m) for name, m in model.named_modules() if name == "score" or name.endswith(".score")]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no `score` head: reward models need AutoModelForSequenceClassification"
        )
    return min(found, key=lambda item: len(item[0]))[1]


def pad_token_id_of(model: nn.Module) -> int | None:
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module.config.pad_token_id
    return None


class RewardLoss:
    """Bradley–Terry: -log σ(r_chosen - r_rejected), summed over pairs, divided by the step's pairs."""

    normaliser = "global_rows"

    def __init__(self):
        self._pad_token_id = PerModel(self._hook_scores)  # a model's pad token id, once its head is hooked
        self._scores: list[torch.Tensor] = []

    def _hook_scores(self, model: nn.Module) -> int | None:
        score_head(model).register_forward_hook(lambda _m, _i, output: self._scores.append(output))
        return pad_token_id_of(model)

    def rewards(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward of every sequence [num_sequences], the model's own pooled output)."""
        pad_token_id = self._pad_token_id(model)
        self._scores.clear()
        out = model(**batch.model_inputs())
        (scores,) = self._scores  # [1, T, 1]
        self._scores.clear()
        ends = sequence_ends(batch.input_ids, batch.position_ids, pad_token_id, batch.num_samples)
        return scores[0, ends, 0].float(), out.logits

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        rewards, pooled = self.rewards(model, batch)
        margin = rewards[0::2] - rewards[1::2]
        # The pooled output joins the graph at zero weight, so wrappers that hook a module's outputs for
        # their backward (FSDP2's root) see it used.
        loss = -F.logsigmoid(margin).sum() + 0.0 * pooled.float().sum()
        return LossOutput(loss, {"accuracy": (margin > 0).float().sum(), "margin": margin.detach().sum()})
