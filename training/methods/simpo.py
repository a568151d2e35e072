"""SimPO (Meng et al. 2024): a margin of length-normalised log-probabilities, chosen over rejected; no reference.

The pairs' forward is DPO's (training/methods/dpo.py: one padding-free row chosen₁ rejected₁ chosen₂ …).
Per pair, with ā = log p(answer) / its tokens:

    loss = -log σ(beta · (ā_chosen - ā_rejected) - gamma)

the paper's Eq. 6, gamma its target reward margin γ. TRL's CPOTrainer (loss_type="simpo") takes the same
simpo_gamma but subtracts gamma / beta inside beta · (…), which comes to the same loss: gamma here is
TRL's simpo_gamma, not divided by beta. The pair losses are summed and divided by the step's pairs, so
a step's loss is exact whatever the micro-batches and ranks. Rewards are TRL's: beta · ā.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import LossOutput, PerModel, takes_logits_to_keep
from training.methods.dpo import pair_metrics, sequence_logps


def simpo_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (loss, beta · margin - gamma) from length-averaged log-probabilities."""
    logits = beta * (chosen - rejected) - gamma
    return -F.logsigmoid(logits), logits


class SimPOLoss:
    """SimPO over a micro-batch of pairs: a sum over pairs, divided by the step's pairs (`global_rows`)."""

    normaliser = "global_rows"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5):
        self.beta, self.gamma = beta, gamma
        self._slices = PerModel(takes_logits_to_keep)

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        logps, tokens = sequence_logps(model, batch, self._slices(model))
        average = logps / tokens
        chosen, rejected = average[0::2], average[1::2]
        losses, logits = simpo_losses(chosen, rejected, self.beta, self.gamma)
        metrics = pair_metrics(self.beta * chosen.detach(), self.beta * rejected.detach())
        metrics |= {
            "margin_minus_gamma": logits.detach().sum(),  # what log σ is taken of: above 0, the pair is past γ
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return LossOutput(losses.sum().float(), metrics)  # fp64 inside, the dtype strategies expect outside
