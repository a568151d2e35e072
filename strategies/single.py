"""One process, the whole model on `env.device`: the reference every other strategy must match."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from strategies.base import OptimizerFactory, SchedulerFactory, trainable_parameters
from strategies.torch_native import TorchNativeStrategy, full_fp32_copies


class SingleStrategy(TorchNativeStrategy):
    """Plain module on one device. Mixed precision is autocast over fp32 trainable params, so AdamW
    always updates fp32 weights; a bf16 compute dtype only changes the matmuls inside `forward_context`."""

    name = "single"

    def _check_world(self) -> None:
        if self.env.world_size != 1:
            raise ValueError(f"single strategy runs on one rank, but world size is {self.env.world_size}")

    def _place(self, model: nn.Module) -> nn.Module:
        """Shared by single and ddp: checkpointing, fp32 trainable params, move to the device."""
        self.prepare_model(model)
        return model.to(self.env.device)

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        self._check_world()
        self.model = self._place(model)
        self.optimizer = make_optimizer(trainable_parameters(self.model))
        self.scheduler = make_scheduler(self.optimizer)

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.options.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.options.compute_dtype)

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Every rank holds the full model here; only rank 0 pays for the copy."""
        if not self.env.is_main:
            return None
        module = self.unwrap()
        return full_fp32_copies(module.state_dict(), module, trainable_only)
