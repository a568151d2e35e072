"""One process, the whole model on `env.device`: the reference every other strategy must match."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from strategies import dcp_checkpoint
from strategies.base import (
    DistEnv,
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
    StrategyOptions,
    clip_grad_norm,
    cpu_fp32_copy,
    enable_gradient_checkpointing,
    optimizer_state_tensors,
    tensor_bytes,
    trainable_names,
    trainable_parameters,
    upcast_trainable_to_fp32,
)


class SingleStrategy(Strategy):
    """Plain module on one device. Mixed precision is autocast over fp32 trainable params, so AdamW
    always updates fp32 weights; a bf16 compute dtype only changes the matmuls inside `forward_context`."""

    name = "single"

    def __init__(self, options: StrategyOptions, env: DistEnv):
        super().__init__(options, env)
        if options.compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"{self.name}: compute dtype {options.compute_dtype} is not supported (fp32 or bf16; "
                "fp16 would need a loss scaler)"
            )

    def _check_world(self) -> None:
        if self.env.world_size != 1:
            raise ValueError(f"single strategy runs on one rank, but world size is {self.env.world_size}")

    def _place(self, model: nn.Module) -> nn.Module:
        """Shared by single and ddp: checkpointing, fp32 trainable params, move to the device."""
        if self.options.gradient_checkpointing != "none":
            enable_gradient_checkpointing(model, self.options.gradient_checkpointing)
        upcast_trainable_to_fp32(model)
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

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        assert self.optimizer is not None and self.scheduler is not None
        norm = clip_grad_norm(trainable_parameters(self.unwrap()), self.options.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_checkpoint(self, directory: Path) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.save(directory, self.unwrap(), self.optimizer, self.scheduler, self.env)

    def load_checkpoint(self, directory: Path) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.load(directory, self.unwrap(), self.optimizer, self.scheduler)

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Every rank holds the full model here; only rank 0 pays for the copy."""
        if not self.env.is_main:
            return None
        module = self.unwrap()
        state = module.state_dict()
        if trainable_only:
            names = trainable_names(module)
            state = {k: v for k, v in state.items() if k in names}
        return {k: cpu_fp32_copy(v) for k, v in state.items()}

    def local_state_bytes(self) -> dict[str, int]:
        assert self.optimizer is not None
        params = list(self.unwrap().parameters())
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }
