"""Stopping every rank at the same step when the cluster asks, however the request reaches the job.

Two requests, each by a signal or a file:
- USR2 (the allocation ends soon): checkpoint, then rank 0 requeues. The batch script's trap and each
  node's agent (cluster/node.py) touch RUN/slurm/stop; a rank that gets USR2 itself remembers it.
- SIGTERM (preemption, scancel): checkpoint if the step boundary comes within the grace period
  (cluster.slurm.grace_s), else stop without writing one, leaving the newest complete checkpoint for the
  requeued job. The trap and the agents touch RUN/slurm/term; a rank that gets SIGTERM remembers when.

After each step every rank adds its flags to one all-reduce, so all agree on the same step: a rank that
stopped alone would leave the others waiting in a collective. Rank 0 alone looks at the files (they are
written on its node, so it sees them first). The agreed flags are read one step after they were reduced,
so the host never waits for the device to finish a step just to learn it should go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.stop_signals import STOP_SIGNALS, StopSignals

REQUEUE, TERMINATE = "requeue", "terminate"


@dataclass(frozen=True)
class StopRequest:
    kind: str  # REQUEUE (USR2) or TERMINATE (SIGTERM)
    checkpoint: bool  # False: SIGTERM, and the step boundary came after the grace period
    grace_s: float = 0.0


def stop_request(
    strategy, stop_file: Path, term_file: Path, grace_s: float, signals: StopSignals | None = None
) -> Callable[[], StopRequest | None]:
    """A should_stop() for the loop: a StopRequest on every rank, one step after any rank saw one; None
    while there is none. Every rank must call it after every step: it is a collective."""
    env = strategy.env
    signals = signals or STOP_SIGNALS
    in_flight: list[tuple[torch.Tensor, object]] = []  # the last step's agreed flags, on their way to the host
    last_call = [time.monotonic()]

    def local_flags() -> list[float]:
        stop = signals.stop or (env.is_main and stop_file.exists())
        term_at = signals.term_at
        if env.is_main and term_at is None:
            try:
                term_at = signals.term_at = term_file.stat().st_mtime  # when the trap or an agent wrote it
            except OSError:
                pass
        now = time.monotonic()
        step_s, last_call[0] = now - last_call[0], now
        # The checkpoint would be written one step from now, when these flags are read.
        late = term_at is not None and time.time() - term_at + step_s > grace_s
        return [float(stop), float(term_at is not None), float(late)]

    def should_stop() -> StopRequest | None:
        flags = torch.tensor(local_flags(), device=env.device)
        agreed = strategy.all_reduce_sum(flags)
        # Reading `agreed` now would make the host wait for the device to finish this step (with NCCL the
        # flags are a device tensor), so they are copied to the host asynchronously and read one step
        # later, when that copy is long done: every rank stops at the step after the request, together.
        cuda = env.device.type == "cuda"
        host = torch.empty(3, pin_memory=cuda)
        host.copy_(agreed, non_blocking=True)
        copied = torch.cuda.Event() if cuda else None
        if copied is not None:
            copied.record()
        in_flight.append((host, copied))
        if len(in_flight) < 2:
            return None
        host, copied = in_flight.pop(0)
        if copied is not None:
            copied.synchronize()  # this event marks the previous step's flags copy, not this step's work
        stop, term, late = (float(v) > 0 for v in host.tolist())
        if term:
            return StopRequest(TERMINATE, checkpoint=not late, grace_s=grace_s)
        if stop:
            return StopRequest(REQUEUE, checkpoint=True)
        return None

    return should_stop
