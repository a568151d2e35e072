"""torch DistributedDataParallel: a full replica per rank, gradients averaged by all-reduce."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from strategies.base import OptimizerFactory, SchedulerFactory, trainable_parameters
from strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    """Everything but wrapping and accumulation is the single strategy's: after the all-reduce every
    rank holds the same full gradients, so the local grad norm is already the global one, and DCP
    dedups the replicated tensors so a checkpoint is written once, not once per rank."""

    name = "ddp"

    def _check_world(self) -> None:
        """DDP on one rank is legal (it degenerates to single) and keeps small jobs on one code path."""

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        self.ensure_process_group()
        module = self._place(model)
        device_ids = None  # CPU: DDP replicates on the module's own device
        if self.env.device.type == "cuda":
            index = self.env.device.index
            device_ids = [index if index is not None else torch.cuda.current_device()]
        # DDP broadcasts rank 0's weights at construction: every replica starts identical.
        # Gradients as views of the all-reduce buckets: one gradient copy per rank instead of two.
        self.model = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
        self.optimizer = make_optimizer(trainable_parameters(module))
        self.scheduler = make_scheduler(self.optimizer)

    def accumulate(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """no_sync keeps non-last micro-steps' gradients local; the last backward all-reduces the sum."""
        assert isinstance(self.model, DistributedDataParallel)
        return contextlib.nullcontext() if is_last_micro_step else self.model.no_sync()
