"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded on dim 0 across ranks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from strategies import dcp_checkpoint
from strategies.base import (
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
    clip_grad_norm,
    cpu_fp32_copy,
    enable_gradient_checkpointing,
    optimizer_state_tensors,
    tensor_bytes,
    trainable_names,
    trainable_parameters,
    upcast_trainable_to_fp32,
)


class FSDPStrategy(Strategy):
    """Each decoder layer is its own FSDP group (one all-gather / reduce-scatter per layer), the root
    group takes what is left (embeddings, final norm, LM head).

    Parameters stay fp32 DTensor shards: with a bf16 compute dtype the MixedPrecisionPolicy casts them
    to bf16 for the all-gather and compute, and reduces gradients in fp32, so AdamW updates fp32
    shards. Gradients are averaged over ranks by the reduce-scatter (FSDP2's default divide)."""

    name = "fsdp"

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        if self.options.compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"fsdp: compute dtype {self.options.compute_dtype} is not supported (fp32, bf16)"
            )
        if self.options.gradient_checkpointing != "none":  # before sharding: it only flips module flags
            enable_gradient_checkpointing(model, self.options.gradient_checkpointing)
        upcast_trainable_to_fp32(model)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        shard_kwargs = {
            "mesh": mesh,
            "reshard_after_forward": self.options.reshard_after_forward,
            "mp_policy": self._mixed_precision(),
            "offload_policy": self._offload(),
        }
        layers = [m for m in model.modules() if isinstance(m, self._layer_classes(model))]
        for layer in layers:
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        self.model = model
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scheduler = make_scheduler(self.optimizer)

    def _mixed_precision(self) -> MixedPrecisionPolicy:
        if self.options.compute_dtype == torch.bfloat16:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _offload(self) -> OffloadPolicy:
        """FSDP2 offloads params, grads and optimizer state together: the sharded params and grads
        live on CPU and AdamW steps there. Pinned memory only means something with a GPU."""
        if self.options.offload_params or self.options.offload_optimizer:
            return CPUOffloadPolicy(pin_memory=self.env.device.type == "cuda")
        return OffloadPolicy()

    def _layer_classes(self, model: nn.Module) -> tuple[type, ...]:
        """options.layer_classes, else the classes a transformers model names in `_no_split_modules`.

        Without per-layer groups the whole model is one group and is all-gathered at once (no memory
        saving during compute), so finding no layer at all is an error, not a silent fallback."""
        if self.options.layer_classes:
            return self.options.layer_classes
        names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
        if not classes:
            raise ValueError(
                f"fsdp: no layer classes to shard in {type(model).__name__}: set StrategyOptions.layer_classes"
            )
        return classes

    def accumulate(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Non-last micro-steps keep full unsharded fp32 gradients locally (no reduce-scatter); the last
        backward reduce-scatters their sum. Memory: one full gradient copy while accumulating."""
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(is_last_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        assert self.optimizer is not None and self.scheduler is not None
        norm = clip_grad_norm(trainable_parameters(self.model), self.options.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_checkpoint(self, directory: Path) -> None:
        """Each rank writes its own DTensor shards; nothing is gathered (see strategies/dcp_checkpoint.py)."""
        assert self.model is not None and self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.save(directory, self.model, self.optimizer, self.scheduler, self.env)

    def load_checkpoint(self, directory: Path) -> None:
        assert self.model is not None and self.optimizer is not None and self.scheduler is not None
        dcp_checkpoint.load(directory, self.model, self.optimizer, self.scheduler)

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """All-gathers one tensor at a time and keeps it on rank 0's CPU only (cpu_offload), so the peak
        is one full tensor on the device, not the model."""
        assert self.model is not None
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
        )
        state = get_model_state_dict(self.model, options=options)
        if not self.env.is_main:
            return None
        if trainable_only:
            names = trainable_names(self.model)
            state = {k: v for k, v in state.items() if k in names}
        return {k: cpu_fp32_copy(v) for k, v in state.items()}

    def local_state_bytes(self) -> dict[str, int]:
        assert self.model is not None and self.optimizer is not None
        params = list(self.model.parameters())
        return {
            "params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params),
            "optimizer": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }
