"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded on dim 0 across ranks."""

from __future__ import annotations

import contextlib

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

from strategies.base import (
    OptimizerFactory,
    SchedulerFactory,
    decoder_layer_classes,
    trainable_parameters,
)
from strategies.torch_native import TorchNativeStrategy, full_fp32_copies


class FSDPStrategy(TorchNativeStrategy):
    """Each decoder layer is its own FSDP group (one all-gather / reduce-scatter per layer), the root
    group takes what is left (embeddings, final norm, LM head).

    Parameters stay fp32 DTensor shards: with a bf16 compute dtype the MixedPrecisionPolicy casts them
    to bf16 for the all-gather and compute, and reduces gradients in fp32, so AdamW updates fp32
    shards. Gradients are averaged over ranks by the reduce-scatter (FSDP2's default divide)."""

    name = "fsdp"
    collective_forward = True

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        self.prepare_model(model)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        shard_kwargs = {
            "mesh": mesh,
            "reshard_after_forward": self.options.reshard_after_forward,
            "mp_policy": self._mixed_precision(),
            "offload_policy": self._offload(),
        }
        classes = self._layer_classes(model)
        layers = [m for m in model.modules() if isinstance(m, classes)]
        for layer in layers:
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        self.model = model
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scheduler = make_scheduler(self.optimizer)

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """Sharded as the policy (a group per decoder layer, the root group), in the same compute dtype,
        always resharded after its forward: it is read once per micro-batch, never trained."""
        model.requires_grad_(False)
        model.to(self.env.device)
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        shard_kwargs = {"mesh": mesh, "reshard_after_forward": True, "mp_policy": self._mixed_precision()}
        for layer in [m for m in model.modules() if isinstance(m, self._layer_classes(model))]:
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        return model.eval()

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
        """The decoder layer classes, each layer its own group. Without them the whole model is one group
        and is all-gathered at once (no memory saving during compute): an error, not a silent fallback."""
        classes = decoder_layer_classes(model)
        if not classes:
            raise ValueError(
                f"fsdp: no layer classes to shard in {type(model).__name__}: it names no `_no_split_modules`"
            )
        return classes

    def accumulate(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Non-last micro-steps keep full unsharded fp32 gradients locally (no reduce-scatter); the last
        backward reduce-scatters their sum. Memory: one full gradient copy while accumulating."""
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(is_last_micro_step)
        return contextlib.nullcontext()

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """All-gathers one tensor at a time and keeps it on rank 0's CPU only (cpu_offload), so the peak
        is one full tensor on the device, not the model."""
        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.model, options=options)
        if not self.env.is_main:
            return None
        return full_fp32_copies(state, self.model, trainable_only)
