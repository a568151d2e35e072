"""What the `sharpen run` tests share: the job sections of a 2-rank run."""

from __future__ import annotations


def two_ranks(strategy: str) -> dict:
    return {"strategy": {"name": strategy}, "resources": {"gpus_per_node": 2}}
