"""What every method shares: LossOutput, the token loss, label columns, the logits_to_keep probe, and
PerModel, what a method learns of a model once."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from training.data.packing import IGNORE_INDEX


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


T = TypeVar("T")


class PerModel(Generic[T]):
    """`compute(model)`, once per model: what a loss reads of the model it is called with (its forward's
    keywords, its kernels), kept as long as that model lives. Keyed by the model itself, weakly: a model
    freed and another built in its memory (the same id()) is another model."""

    def __init__(self, compute: Callable[[nn.Module], T]):
        self._compute = compute
        self._values: weakref.WeakKeyDictionary[nn.Module, T] = weakref.WeakKeyDictionary()

    def __call__(self, model: nn.Module) -> T:
        try:
            return self._values[model]
        except KeyError:
            value = self._values[model] = self._compute(model)
            return value
