"""How a model is placed and sharded: one interface (base.py), one file per strategy, and this registry of
what each strategy is: its class, its footprint (bytes per rank), its capabilities and the candidates the
planner compares for `strategy.name: auto`.

Importing this package loads no torch: the registry names each strategy's module, imported on use; the
footprints and capabilities are plain arithmetic and data. Adding a strategy: its module, an entry here
(and in CANDIDATES where auto should consider it), and its name in launcher/spec.py's StrategySpec.name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import import_module
from typing import TYPE_CHECKING, Any

from strategies.capabilities import Capabilities
from strategies.footprint import Footprint
from strategies.footprint.fsdp import FSDPFootprint
from strategies.footprint.replicated import ReplicatedFootprint, SingleFootprint
from strategies.footprint.zero import PartitionedFootprint, Zero3Footprint

if TYPE_CHECKING:
    from strategies.base import DistEnv, Strategy, StrategyOptions


@dataclass(frozen=True)
class Registered:
    """One strategy: where its class is, what a rank of it holds, and what it can run."""

    module: str
    cls: str
    footprint: Footprint
    capabilities: Capabilities
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the class


DEEPSPEED = Capabilities(
    offloads=("optimizer",),
    compile_conflict="DeepSpeed ({name}), whose ZeRO hooks run inside every layer",
    packages=("deepspeed",),
    checkpoint_family="deepspeed",
)
ZERO3 = replace(DEEPSPEED, offloads=("optimizer", "params"), shards_parameters=True)


def _deepspeed(stage: int, footprint: Footprint, capabilities: Capabilities) -> Registered:
    return Registered("strategies.deepspeed", "DeepSpeedStrategy", footprint, capabilities, {"stage": stage})


REGISTRY: dict[str, Registered] = {
    "single": Registered("strategies.single", "SingleStrategy", SingleFootprint(), Capabilities(max_ranks=1)),
    "ddp": Registered("strategies.ddp", "DDPStrategy", ReplicatedFootprint(), Capabilities()),
    "fsdp": Registered(
        "strategies.fsdp",
        "FSDPStrategy",
        FSDPFootprint(),
        Capabilities(offloads=("optimizer", "params"), offload_moves_all_state=True, shards_parameters=True),
    ),
    "zero1": _deepspeed(1, PartitionedFootprint(1), DEEPSPEED),
    "zero2": _deepspeed(2, PartitionedFootprint(2), DEEPSPEED),
    "zero3": _deepspeed(3, Zero3Footprint(), ZERO3),
}
# (strategy, offload) pairs `auto` compares, fastest first: least communication (ddp: one all-reduce;
# zero1/zero2: reduce-scatter + all-gather; fsdp/zero3: parameters gathered every layer, forward and
# backward), then offloading to the host (PCIe-bound). On one rank there is nothing to communicate.
CANDIDATES = (
    ("ddp", "none"),
    ("zero1", "none"),
    ("zero2", "none"),
    ("fsdp", "none"),
    ("zero3", "none"),
    ("zero2", "optimizer"),
    ("zero3", "optimizer"),
    ("fsdp", "params"),
    ("zero3", "params"),
)
ONE_RANK_CANDIDATES = (("single", "none"), ("zero2", "optimizer"), ("fsdp", "params"), ("zero3", "params"))


def registered_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def _entry(name: str) -> Registered:
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}")
    return REGISTRY[name]


def create_strategy(name: str, options: StrategyOptions, env: DistEnv) -> Strategy:
    """The strategy called `name` (one of registered_names())."""
    entry = _entry(name)
    return getattr(import_module(entry.module), entry.cls)(options, env, **entry.kwargs)


def footprint(name: str) -> Footprint:
    """What one rank of strategy `name` holds, in bytes (torch-free)."""
    return _entry(name).footprint


def capabilities(name: str) -> Capabilities:
    return _entry(name).capabilities


def candidate_order(world: int) -> tuple[tuple[str, str], ...]:
    """The (strategy, offload) pairs `auto` compares on `world` ranks, fastest first."""
    return ONE_RANK_CANDIDATES if world == 1 else CANDIDATES


def checkpoint_family(name: str) -> str:
    """Which checkpoint format a strategy writes: strategies of one family resume each other's checkpoints
    (single, ddp and fsdp share torch.distributed.checkpoint; the ZeRO stages share DeepSpeed's)."""
    return capabilities(name).checkpoint_family
