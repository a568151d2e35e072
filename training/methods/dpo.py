"""Direct preference optimisation: the policy's log-ratio of chosen over rejected, against a reference model.

A micro-batch is one padding-free row chosen₁ rejected₁ chosen₂ rejected₂ … (each pair is one stored
row, training/data/): one forward gives every sequence's summed log-probability of its answer tokens.
The reference model's log-probabilities come from one of two places, never from a second copy:

- adapter disabled (LoRA/QLoRA, reference: auto): the same model under peft's disable_adapter(), a
  no-grad forward of the same micro-batch in the same step. No extra memory; one more forward without
  backward per micro-batch (about a third more compute).
- precomputed (full fine-tuning, or reference: precompute): before step 1 the initial model, placed by
  the job's own strategy, computes each pair's log-probabilities once; they are kept in RUN/reference/
  keyed by dataset row, and a resumed run reads them back. No memory and no per-step cost, and no
  strategy needs to place a second, frozen model (which a full reference would need under FSDP/ZeRO-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import IGNORE_INDEX, LossOutput, PerModel, label_columns, takes_logits_to_keep


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[T] index of the sequence each token of a padding-free [1, T] row belongs to (positions restart at 0)."""
    if position_ids.shape[0] != 1:
        raise ValueError(
            f"preference micro-batches are one padding-free row, got {position_ids.shape[0]} rows"
        )
    return torch.cumsum((position_ids[0] == 0).long(), 0) - 1


def sequence_logps(model: nn.Module, batch, slice_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) per sequence, label tokens per sequence), each [num_sequences] in fp64.

    With `slice_logits` the output projection runs on label positions only, as CausalLMLoss does."""
    labels, sequences, keep = batch.labels[0], sequence_index(batch.position_ids), {}
    if slice_logits:
        columns = label_columns(batch)  # one row: its label positions
        labels, sequences, keep = labels[columns], sequences[columns], {"logits_to_keep": columns}
    out = model(**batch.model_inputs(), **keep)
    logits = out.logits[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits up to fp32, never down
    token_logps = -F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").double()
    valid = (labels != IGNORE_INDEX).double()
    zeros = torch.zeros(batch.num_samples, dtype=torch.float64, device=logits.device)  # sums of many terms
    return zeros.index_add(0, sequences, token_logps * valid), zeros.index_add(0, sequences, valid)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from log-probabilities, as TRL defines them.

    sigmoid: -log σ(β·h), conservative with label smoothing ε: -(1-ε)·log σ(β·h) - ε·log σ(-β·h);
    ipo: (h - 1/(2β))², on log-probabilities averaged per token (the caller divides); hinge: max(0, 1 - β·h);
    where h = (chosen - rejected) - (ref_chosen - ref_rejected). Rewards are β·(policy - reference)."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rewards/ sums every preference loss logs, from its per-pair chosen and rejected rewards."""
    margin = chosen - rejected
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margin": margin.sum(),
        "rewards/accuracy": (margin > 0).float().sum(),
    }


class DPOLoss:
    """DPO over a micro-batch of pairs: a sum over pairs, divided by the step's pairs (`global_rows`).

    With `sft_weight` > 0 (RPO, Pang et al. 2024) each pair adds sft_weight × the NLL of its chosen answer
    per answer token (-log p(chosen) / its tokens), as TRL's `sft` loss term (formerly rpo_alpha). TRL
    averages that NLL over all chosen tokens of its batch; here it is averaged per pair, then summed over
    pairs and divided by the step's pairs like the DPO term, so a step's loss is exact whatever the
    micro-batches and ranks (the two agree when every chosen answer has the same length)."""

    normaliser = "global_rows"

    def __init__(
        self,
        reference,
        beta: float = 0.1,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
    ):
        self.reference, self.beta, self.loss, self.label_smoothing = reference, beta, loss, label_smoothing
        self.sft_weight = sft_weight
        self._slices = PerModel(takes_logits_to_keep)

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        reference = self.reference.logps(model, batch)  # first: its activations are gone before ours are made
        policy, tokens = sequence_logps(model, batch, self._slices(model))
        nll = -policy[0::2] / tokens[0::2]  # each chosen answer's NLL per token
        if self.loss == "ipo":
            policy, reference = policy / tokens, reference / tokens
        losses, chosen, rejected = dpo_losses(
            policy[0::2],
            policy[1::2],
            reference[0::2],
            reference[1::2],
            self.beta,
            self.loss,
            self.label_smoothing,
        )
        metrics = pair_metrics(chosen, rejected)
        if self.sft_weight:
            losses = losses + self.sft_weight * nll
            metrics["nll_loss"] = nll.detach().sum()
        return LossOutput(losses.sum().float(), metrics)  # fp64 inside, the dtype strategies expect outside
