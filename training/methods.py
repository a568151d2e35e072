"""Training methods as losses over a micro-batch. Each returns a *sum*; the loop divides by the step's
global count (label tokens for SFT and pretraining), so accumulation and ranks never skew the mean."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # sum of per-token (or per-pair) losses of this micro-batch
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # summed like loss_sum


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over tokens whose label is not IGNORE_INDEX. Labels are already shifted."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class CausalLMLoss:
    """SFT and pretraining: next-token cross-entropy on the tokens the data marked with labels."""

    normaliser = "global_label_tokens"

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        )
        return LossOutput(token_loss_sum(out.logits, batch.labels))


def create_method(kind: str):
    if kind in ("sft", "pretrain"):
        return CausalLMLoss()
    raise ValueError(f"method {kind!r} is not available in this version")
