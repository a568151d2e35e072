"""A model filled from a checkpoint of any strategy, offline (one process, no process group: `sharpen export`):
which checkpoint family's reader reads a directory, and the copy into the model that checks nothing is missing.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from strategies.base import trainable_names

# checkpoint family (Capabilities.checkpoint_family) -> the module that writes it, in the order they are
# tried; each has holds_checkpoint(dir), read_full_weights(dir, model, trainable_only) and KIND (its name)
READERS = {"deepspeed": "strategies.deepspeed", "dcp": "strategies.dcp_checkpoint"}


def load_full_weights(model: nn.Module, checkpoint: Path, trainable_only: bool) -> None:
    """Fill `model` from a checkpoint of any strategy; every (trainable) parameter must be in it."""
    formats = [import_module(module) for module in READERS.values()]
    reader = next((f for f in formats if f.holds_checkpoint(checkpoint)), None)
    if reader is None:
        raise UserError(f"{checkpoint}: neither {' nor '.join(f.KIND for f in formats)} checkpoint")
    copy_into(model, reader.read_full_weights(checkpoint, model, trainable_only), checkpoint, trainable_only)


def copy_into(model: nn.Module, entries: dict[str, Any], checkpoint: Path, trainable_only: bool) -> None:
    """Copy `entries` into the model's parameters and buffers, checking nothing needed is missing."""
    if trainable_only:  # buffers of the base, quantisation state: not the export's to take
        entries = {name: value for name, value in entries.items() if name in trainable_names(model)}
    live = model.state_dict()
    unknown = sorted(set(entries) - set(live))
    if unknown:
        raise UserError(f"{checkpoint}: holds weights this model does not have, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, value in entries.items():
            tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value  # lazy ZeRO tensors
            if tensor.shape != live[name].shape:
                raise UserError(
                    f"{checkpoint}: {name} has shape {tuple(tensor.shape)}, the model {tuple(live[name].shape)}"
                )
            if tensor.data_ptr() != live[name].data_ptr():
                live[name].copy_(tensor)
    # A parameter counts as restored when any of its names (tied weights have two) was in the checkpoint.
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad or not trainable_only:
            names_of.setdefault(id(param), []).append(name)
    missing = sorted(names[0] for names in names_of.values() if not set(names) & set(entries))
    if missing:
        raise UserError(f"{checkpoint}: {len(missing)} weights are missing from it, e.g. {missing[:3]}")
