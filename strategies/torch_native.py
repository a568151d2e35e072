"""What the torch-native strategies (single, ddp, fsdp) share: a torch optimizer over the params the
rank holds, clip-and-step, DCP checkpoints and the bytes held. DeepSpeed's engine does these its own way."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from strategies import dcp_checkpoint
from strategies.base import (
    Strategy,
    clip_grad_norm,
    cpu_fp32_copy,
    optimizer_state_tensors,
    tensor_bytes,
    trainable_names,
    trainable_parameters,
)


class TorchNativeStrategy(Strategy):
    """A strategy whose optimizer is the torch optimizer itself, over the module's (local) parameters:
    subclasses place or wrap the model in `setup` and gather it in `full_state_dict`."""

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
        """Each rank writes its own shards (replicated tensors once); see strategies/dcp_checkpoint.py."""
        assert self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.save(directory, self.unwrap(), self.optimizer, self.scheduler, self.env)

    def load_checkpoint(self, directory: Path) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.load(directory, self.unwrap(), self.optimizer, self.scheduler)

    def local_state_bytes(self) -> dict[str, int]:
        assert self.optimizer is not None
        params = list(self.unwrap().parameters())
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }


def full_fp32_copies(
    state: dict[str, torch.Tensor], module: nn.Module, trainable_only: bool
) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of a full state dict of `module`, only its trainable entries when asked."""
    if trainable_only:
        names = trainable_names(module)
        state = {k: v for k, v in state.items() if k in names}
    return {k: cpu_fp32_copy(v) for k, v in state.items()}
