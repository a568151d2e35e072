"""Stopping every rank at the same step when the cluster announces the end of the allocation.

On SLURM the batch script's USR2 trap touches RUN/slurm/stop (cluster/slurm.py). After each step rank 0
looks for that file and one all-reduce of a flag makes every rank agree on the same step: a rank that
stopped alone would leave the others waiting in a collective. The agreed flag is read one step after it
was reduced, so the host never waits for the device to finish a step just to learn it should go on.
The loop then checkpoints and hands over to the stop hook the worker gave it (cluster/requeue.py on SLURM).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def stop_file_request(strategy, stop_file: Path) -> Callable[[], bool]:
    """A should_stop() for the loop: True on every rank, one step after rank 0 saw `stop_file`. Every rank
    must call it after every step: it is a collective."""
    env = strategy.env
    in_flight: list[tuple[torch.Tensor, object]] = []  # the last step's agreed flag, on its way to the host

    def should_stop() -> bool:
        # Only rank 0 touches the filesystem; the file is written on its node, so it sees it first.
        flag = torch.full((1,), float(env.is_main and stop_file.exists()), device=env.device)
        agreed = strategy.all_reduce_sum(flag)
        # Reading `agreed` now would make the host wait for the device to finish this step (with NCCL the
        # flag is a device tensor), so it is copied to the host asynchronously and read one step later,
        # when that copy is long done: every rank stops at the step after the request, together.
        cuda = env.device.type == "cuda"
        host = torch.empty(1, pin_memory=cuda)
        host.copy_(agreed, non_blocking=True)
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        in_flight.append((host, copied))
        if len(in_flight) < 2:
            return False
        host, copied = in_flight.pop(0)
        if copied is not None:
            copied.synchronize()  # this event marks the previous step's flag copy, not this step's work
        return bool(host.item() > 0)

    return should_stop
