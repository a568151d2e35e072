"""ORPO (Hong et al. 2024): SFT on the chosen answer plus an odds-ratio term, chosen over rejected; no reference.

The pairs' forward is DPO's (training/methods/dpo.py: one padding-free row chosen₁ rejected₁ chosen₂ …).
Per pair, with ā = log p(answer) / its tokens (length-averaged, as TRL's ORPOTrainer):

    log_odds = (ā_chosen - ā_rejected) - (log(1 - exp ā_chosen) - log(1 - exp ā_rejected))
    loss     = -ā_chosen - beta · log σ(log_odds)

The first term is the NLL of chosen per answer token. TRL averages it over every chosen token of its
batch, prompt tokens included; here it is the answer's (the paper's L_SFT, the tokens a preference is
about) averaged per pair, and the pair losses are summed and divided by the step's pairs, so a step's
loss is exact whatever the micro-batches and ranks. Rewards are TRL's: beta · ā.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import LossOutput, PerModel, takes_logits_to_keep
from training.methods.dpo import pair_metrics, sequence_logps

LOG_HALF = -math.log(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Mächler 2012; TRL's ORPOTrainer branches the same way)."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, nll, log σ(log_odds), log_odds) from length-averaged log-probabilities."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    return nll - beta * ratio, nll, ratio, log_odds


class ORPOLoss:
    """ORPO over a micro-batch of pairs: a sum over pairs, divided by the step's pairs (`global_rows`)."""

    normaliser = "global_rows"

    def __init__(self, beta: float = 0.1):
        self.beta = beta
        self._slices = PerModel(takes_logits_to_keep)

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        logps, tokens = sequence_logps(model, batch, self._slices(model))
        average = logps / tokens
        chosen, rejected = average[0::2], average[1::2]
        losses, nll, ratio, log_odds = orpo_losses(chosen, rejected, self.beta)
        metrics = pair_metrics(self.beta * chosen.detach(), self.beta * rejected.detach())
        metrics |= {
            "nll_loss": nll.detach().sum(),
            "log_odds_ratio": ratio.detach().sum(),  # TRL's names: mean log σ(log_odds), mean log_odds
            "log_odds_chosen": log_odds.detach().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return LossOutput(losses.sum().float(), metrics)  # fp64 inside, the dtype strategies expect outside
