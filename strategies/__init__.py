"""How a model is placed and sharded: one interface (base.py), one file per strategy."""

from __future__ import annotations

from strategies.base import DistEnv, Strategy, StrategyOptions


def create_strategy(name: str, options: StrategyOptions, env: DistEnv) -> Strategy:
    """The strategy called `name` (single, ddp, fsdp, zero1, zero2, zero3)."""
    if name == "single":
        from strategies.single import SingleStrategy

        return SingleStrategy(options, env)
    if name == "ddp":
        from strategies.ddp import DDPStrategy

        return DDPStrategy(options, env)
    if name == "fsdp":
        from strategies.fsdp import FSDPStrategy

        return FSDPStrategy(options, env)
    if name in ("zero1", "zero2", "zero3"):
        from strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(options, env, stage=int(name[-1]))
    raise ValueError(f"unknown strategy {name!r}")


def checkpoint_family(name: str) -> str:
    """Which checkpoint format a strategy writes: strategies of one family resume each other's checkpoints
    (single, ddp and fsdp share torch.distributed.checkpoint; the ZeRO stages share DeepSpeed's)."""
    return "deepspeed" if name in ("zero1", "zero2", "zero3") else "dcp"


__all__ = ["DistEnv", "Strategy", "StrategyOptions", "checkpoint_family", "create_strategy"]
