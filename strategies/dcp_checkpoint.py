"""Checkpoints of the torch-native strategies (single, ddp, fsdp) through torch.distributed.checkpoint.

One format for all three: DCP keys tensors by parameter name and stores each shard with its global
offsets, so a checkpoint written by any of them on N ranks loads into any of them on M ranks.
Layout of `directory`: `.metadata` and `__<rank>_0.distcp` (DCP, model + optimizer), `scheduler.pt`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from strategies.base import DistEnv, has_frozen_parameters

SCHEDULER_FILE = "scheduler.pt"


def _options(model: nn.Module, loading: bool) -> StateDictOptions:
    """Frozen params (a LoRA base) are not saved: they come back from the pretrained weights.

    The optimizer state is flattened to `state.<param name>.<key>` so that it is keyed by names only,
    not by param-group positions: resharding and world-size changes only ever see named tensors."""
    frozen = has_frozen_parameters(model)
    return StateDictOptions(
        ignore_frozen_params=frozen, flatten_optimizer_state_dict=True, strict=not (loading and frozen)
    )


def save(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    env: DistEnv,
) -> None:
    """Every rank writes its own shards (DCP dedups replicated tensors); rank 0 also the scheduler."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model, loading=False))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=directory)
    if env.is_main:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    if env.world_size > 1:
        torch.distributed.barrier()  # the scheduler file exists once any rank returns


def load(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Read this rank's slices of what `save` wrote (on any world size) into the live model and optimizer.

    `get_state_dict` first builds the target structure (and materialises empty AdamW state), then DCP
    fills it in place from whichever files hold the matching slices."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no torch.distributed.checkpoint (no .metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model, loading=False))
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(model, loading=True),
    )
    scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
