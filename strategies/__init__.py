"""How a model is placed and sharded: one interface (base.py), one file per strategy.

Importing this package loads no torch: the registry names each strategy's module, imported on use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strategies.base import DistEnv, Strategy, StrategyOptions

# name -> (module, class, keyword arguments of the class)
REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "single": ("strategies.single", "SingleStrategy", {}),
    "ddp": ("strategies.ddp", "DDPStrategy", {}),
    "fsdp": ("strategies.fsdp", "FSDPStrategy", {}),
    "zero1": ("strategies.deepspeed", "DeepSpeedStrategy", {"stage": 1}),
    "zero2": ("strategies.deepspeed", "DeepSpeedStrategy", {"stage": 2}),
    "zero3": ("strategies.deepspeed", "DeepSpeedStrategy", {"stage": 3}),
}


def registered_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def create_strategy(name: str, options: StrategyOptions, env: DistEnv) -> Strategy:
    """The strategy called `name` (one of registered_names())."""
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}")
    module, cls, kwargs = REGISTRY[name]
    return getattr(import_module(module), cls)(options, env, **kwargs)


def checkpoint_family(name: str) -> str:
    """Which checkpoint format a strategy writes: strategies of one family resume each other's checkpoints
    (single, ddp and fsdp share torch.distributed.checkpoint; the ZeRO stages share DeepSpeed's)."""
    return "deepspeed" if REGISTRY[name][0] == "strategies.deepspeed" else "dcp"
