"""SFT and pretraining: next-token cross-entropy on the tokens the data marked with labels."""

from __future__ import annotations

from torch import nn

from training.data.packing import IGNORE_INDEX
from training.kernels.fused_loss import LABELS as FUSED_LABELS
from training.kernels.fused_loss import fuses_head_loss
from training.kernels.last_layer import label_positions_kwargs, prunes_last_layer
from training.methods.base import LossOutput, PerModel, label_columns, takes_logits_to_keep, token_loss_sum
from training.moe import RouterLoss, router_aux_coefficient, router_loss


class CausalLMLoss:
    """SFT and pretraining: next-token cross-entropy on the tokens the data marked with labels.

    Logits are computed only at the positions that carry a label (`logits_to_keep`): with loss on
    completions only, most positions are prompt, and the vocab projection and its backward there are
    pure waste (measured on the CPU bench job: 80% of positions, 10% of the step). The loss is the same
    sum over the same tokens. The positions come from the collator, found on the host (label_columns).
    Where the fused loss applies (a supported family's plain lm_head, frozen or trained) the model computes
    the loss itself, in chunks that never hold the logits of every position at once
    (training/kernels/fused_loss.py).
    A mixture-of-experts model adds its router's load-balancing loss times its coefficient (the model
    config's router_aux_loss_coef, or model.router_aux_loss_coef), logged as `router_aux_loss`.
    """

    normaliser = "global_label_tokens"

    def __init__(self):
        self._features = PerModel(features)

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        labels, keep = batch.labels, {}
        slices, prunes, fused, router = self._features(model)
        if slices:
            columns = label_columns(batch)
            labels = labels[:, columns]
            # A pruned last layer (training/kernels/last_layer.py) already returns only these positions.
            keep = label_positions_kwargs(columns) if prunes else {"logits_to_keep": columns}
        if fused:  # the model returns the summed loss and no logits (training/kernels/fused_loss.py)
            return LossOutput(model(**batch.model_inputs(), **keep, **{FUSED_LABELS: labels}).loss)
        if router is not None:  # an MoE model: its routers' logits are caught for the load-balancing loss
            router.clear()
        out = model(**batch.model_inputs(), **keep)
        if out.logits.shape[:-1] != labels.shape:
            raise RuntimeError(f"logits of shape {tuple(out.logits.shape)} for labels of shape {tuple(labels.shape)}")
        loss_sum = token_loss_sum(out.logits, labels)
        if router is None:
            return LossOutput(loss_sum)
        # Weighted by this micro-batch's label tokens: divided by the step's global label count with the
        # cross-entropy, it is the label-weighted mean of the micro-batches' aux losses.
        weighted_aux = router.loss(batch.padding_mask).float() * (labels != IGNORE_INDEX).sum()
        coefficient = router_aux_coefficient(model)
        if coefficient:
            loss_sum = loss_sum + coefficient * weighted_aux
        return LossOutput(loss_sum, {"router_aux_loss": weighted_aux.detach()})


def features(model: nn.Module) -> tuple[bool, bool, bool, RouterLoss | None]:
    """(its forward takes logits_to_keep, its last layer is pruned, it computes the fused loss, its routers'
    load-balancing loss: None for a model without routed experts)."""
    fused = fuses_head_loss(model)
    return takes_logits_to_keep(model), prunes_last_layer(model), fused, None if fused else router_loss(model)
