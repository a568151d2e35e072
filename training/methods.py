"""Training methods as losses over a micro-batch. Each returns a *sum*; the loop divides by the step's
global count (label tokens for SFT and pretraining, pairs for DPO and reward models: training/dpo.py,
training/reward.py), so accumulation and ranks never skew the mean."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.fused_loss import LABELS as FUSED_LABELS
from training.fused_loss import fuses_frozen_head_loss
from training.last_layer import label_positions_kwargs, prunes_last_layer

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


def label_columns(batch) -> torch.Tensor:
    """Columns where any row has a label: one row when padding-free, every label position of it.

    The collator finds them on the host; finding them on a CUDA device (nonzero) would make the host wait
    for the device mid-step, so only batches made elsewhere (without them) pay that."""
    if batch.label_columns is not None:
        return batch.label_columns
    return (batch.labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the outermost transformers model under `model`'s wrappers (DDP, PEFT, DeepSpeed) declares
    `logits_to_keep`, so the output projection can run on chosen positions only."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return "logits_to_keep" in inspect.signature(type(module).forward).parameters
    return False


class CausalLMLoss:
    """SFT and pretraining: next-token cross-entropy on the tokens the data marked with labels.

    Logits are computed only at the positions that carry a label (`logits_to_keep`): with loss on
    completions only, most positions are prompt, and the vocab projection and its backward there are
    pure waste (measured on the CPU bench job: 80% of positions, 10% of the step). The loss is the same
    sum over the same tokens. The positions come from the collator, found on the host (label_columns).
    Where the output projection is frozen (LoRA, QLoRA) the model computes the loss itself, in chunks that
    never hold the logits of every position at once (training/fused_loss.py).
    """

    normaliser = "global_label_tokens"

    def __init__(self):
        # id(model) -> (its forward takes logits_to_keep, its last layer is pruned, it computes the fused loss)
        self._features: dict[int, tuple[bool, bool, bool]] = {}

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        if id(model) not in self._features:
            self._features[id(model)] = (takes_logits_to_keep(model), prunes_last_layer(model),
                                         fuses_frozen_head_loss(model))
        labels, keep = batch.labels, {}
        slices, prunes, fused = self._features[id(model)]
        if slices:
            columns = label_columns(batch)
            labels = labels[:, columns]
            # A pruned last layer (training/last_layer.py) already returns only these positions.
            keep = label_positions_kwargs(columns) if prunes else {"logits_to_keep": columns}
        if fused:  # the model returns the summed loss and no logits (training/fused_loss.py)
            return LossOutput(model(**batch.model_inputs(), **keep, **{FUSED_LABELS: labels}).loss)
        out = model(**batch.model_inputs(), **keep)
        if out.logits.shape[:-1] != labels.shape:
            raise RuntimeError(f"logits of shape {tuple(out.logits.shape)} for labels of shape {tuple(labels.shape)}")
        return LossOutput(token_loss_sum(out.logits, labels))


def create_method(kind: str, settings=None, reference=None):
    """The loss of method `kind`. DPO also takes its method section and its reference (training/dpo.py)."""
    if kind in ("sft", "pretrain"):
        return CausalLMLoss()
    if kind == "reward":
        from training.reward import RewardLoss

        return RewardLoss()
    if kind == "dpo":
        from training.dpo import DPOLoss

        return DPOLoss(reference, settings.beta, settings.loss, settings.label_smoothing)
    raise ValueError(f"method {kind!r} is not available in this version")
