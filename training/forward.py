"""One micro-batch through the strategy's model, as training, evaluation and reference passes all run it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from strategies.base import Strategy
from training.data.packing import MicroBatch

Result = TypeVar("Result")


def run_forward(strategy: Strategy, fn: Callable[[nn.Module, MicroBatch], Result], micro: MicroBatch) -> Result:
    """`fn(strategy.model, micro)` with `micro` moved to the rank's device (an eager mask recast to the
    compute dtype), under the strategy's forward context (autocast where it does mixed precision that way)."""
    micro = micro.to(strategy.env.device, dtype=strategy.options.compute_dtype)
    with strategy.forward_context():
        return fn(strategy.model, micro)
