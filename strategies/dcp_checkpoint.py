"""Checkpoints of the torch-native strategies (single, ddp, fsdp) through torch.distributed.checkpoint.

One format for all three: DCP keys tensors by parameter name and stores each shard with its global
offsets, so a checkpoint written by any of them on N ranks loads into any of them on M ranks.
Layout of `directory`: `.metadata` and `__<rank>_0.distcp` (DCP, model + optimizer), `scheduler.pt`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from launcher.errors import UserError
from strategies.base import DistEnv, has_frozen_parameters, trainable_names

SCHEDULER_FILE = "scheduler.pt"
METADATA_FILE = ".metadata"  # DCP's index of every shard: a checkpoint dir of this family has one
KIND = f"a DCP ({METADATA_FILE})"  # how strategies/full_weights.py names this format


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
    if not holds_checkpoint(directory):
        raise FileNotFoundError(f"{directory} holds no torch.distributed.checkpoint (no {METADATA_FILE})")
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


def holds_checkpoint(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def read_full_weights(directory: Path, model: nn.Module, trainable_only: bool) -> dict[str, Any]:
    """The checkpoint's `model.*` entries, read without a process group straight into the model's tensors.

    Keys are the module's state-dict names (DCP stores {"model": ..., "optimizer": ...} flattened with
    a dot). A LoRA checkpoint holds the adapter's params, and under QLoRA also the 4-bit base's
    quantisation state (absmax, quant_map: not params, so not filtered out as frozen): only the
    adapter is taken, the base comes from the pretrained weights."""
    try:
        saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as error:
        raise UserError(f"{directory / METADATA_FILE}: cannot read it: {error}") from None
    names = {key.removeprefix("model.") for key in saved if key.startswith("model.")}
    if trainable_only:
        names &= trainable_names(model)
    live = model.state_dict()
    unknown = sorted(names - set(live))
    if unknown:
        raise UserError(f"{directory}: holds weights this model does not have, e.g. {unknown[:3]}")
    wanted = {name: live[name] for name in names}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": wanted}, checkpoint_id=str(directory), no_dist=True)
    except Exception as error:
        raise UserError(f"{directory}: cannot read this checkpoint: {error}") from None
    return wanted
