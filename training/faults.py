"""Fault injection for tests and drills, from one variable: SHARPEN_FAULT=POINT:STEP[@RANK].

  kill-after-step:N   SIGKILL this rank right after optimizer step N (and its checkpoint, if any)
  kill-in-save:N      SIGKILL this rank while checkpoint step-N is half written (shards on disk, no marker)
  fill-disk-in-save:N fill the checkpoint's filesystem (a file in step-N.tmp) after the space check passed,
                      as another writer would: the checkpoint's own write then meets a real ENOSPC
  hang-after-step:N   stop making progress right after optimizer step N, for ever (the other ranks then
                      wait in the next collective): what the hang watch must find, name and stop

Without @RANK every rank is hit. A real kill -9 and a real hang, so the launcher's handling is what is tested.
"""

from __future__ import annotations

import errno
import os
import signal
import time

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
    if _wanted(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(point: str, step: int, rank: int) -> None:
    if _wanted(point, step, rank):
        while True:
            time.sleep(3600)


def _wanted(point: str, step: int, rank: int) -> bool:
    if _FAULT is None:
        return False
    want_point, want_step, want_rank = _FAULT
    return point == want_point and step == want_step and want_rank in (None, rank)


def maybe_fill_disk(point: str, step: int, rank: int, path) -> None:
    """Write zeros to `path` until its filesystem is full (meant for a small tmpfs in a test)."""
    if not _wanted(point, step, rank):
        return
    block = bytes(1 << 16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
