"""What a strategy can run: the facts it declares in the registry (strategies/__init__.py), from which the
job rules (strategies/job_rules.py), the planner's choices, `sharpen doctor` and resume are decided."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """One strategy's declared capabilities; the defaults are a plain data-parallel strategy's."""

    offloads: tuple[str, ...] = ()  # the strategy.offload choices it takes besides none
    # any offload puts params, grads and optimizer state on the host together (FSDP2's CPUOffloadPolicy)
    offload_moves_all_state: bool = False
    shards_parameters: bool = False  # each rank stores a slice of every weight (so 4-bit storage must match)
    # why torch.compile cannot run under it, completing "model.compile is not supported with ..."; "": it can.
    # `{name}` is the strategy's name.
    compile_conflict: str = ""
    max_ranks: int | None = None  # None: any number of ranks
    packages: tuple[str, ...] = ()  # importable modules it needs beyond torch (`sharpen doctor` checks them)
    # strategies of one family read each other's checkpoints (strategies/full_weights.py reads each offline)
    checkpoint_family: str = "dcp"

    @property
    def compiles(self) -> bool:
        return not self.compile_conflict

    def runs_on(self, world: int) -> bool:
        return self.max_ranks is None or world <= self.max_ranks
