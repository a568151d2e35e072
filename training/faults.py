"""Fault injection for tests and drills, from one variable: SHARPEN_FAULT=POINT:STEP[@RANK].

  kill-after-step:N   SIGKILL this rank right after optimizer step N (and its checkpoint, if any)
  kill-in-save:N      SIGKILL this rank while checkpoint step-N is half written (shards on disk, no marker)

Without @RANK every rank is killed. A real kill -9, so the launcher's failure handling is what is tested.
"""

from __future__ import annotations

import os
import signal

from training.env_hooks import FAULT


def _parse() -> tuple[str, int, int | None] | None:
    value = os.environ.get(FAULT, "").strip()
    if not value:
        return None
    point, _, rest = value.partition(":")
    step, _, rank = rest.partition("@")
    return point, int(step), int(rank) if rank else None


_FAULT = _parse()


def maybe_kill(point: str, step: int, rank: int) -> None:
    if _FAULT is None:
        return
    want_point, want_step, want_rank = _FAULT
    if point == want_point and step == want_step and want_rank in (None, rank):
        os.kill(os.getpid(), signal.SIGKILL)
