"""Each rank's progress, for the launcher's hang watch (cluster/hang_watch.py): no collective, no sync.

The loop calls `beat()` every micro-step (and generation, evaluation and the reference precompute call it
as they go): that only sets a few attributes. A daemon thread writes them to RUN/logs/heartbeat/rank-N.json
twice a second when they changed, with the limit this rank's next beat must come within (`limit_s`). The
watch in the process that started the rank reads those files; when no rank of its node has beaten within
its limit it sends STACK_SIGNAL, which faulthandler answers (in C, even while the rank is stuck inside a
collective) by writing every thread's Python stack into the rank's log, then it stops the ranks.

The limit: train.hang_timeout_s when the job sets it, else max(AUTO_HANG_FLOOR_S, 10 x the slowest step so
far, the time start-up took). Until this process's first step has ended (loading, compiling, the first
collectives), and while a checkpoint or final/ is written, it is at least STARTUP_HANG_LIMIT_S.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from launcher.plan import AUTO_HANG_FLOOR_S, STARTUP_HANG_LIMIT_S

HEARTBEAT_DIR = "logs/heartbeat"
# The watch's request for every thread's stack (faulthandler): a real-time signal, so that USR1, USR2 and
# URG stay free for SLURM's stop request (cluster.slurm.signal).
STACK_SIGNAL = signal.SIGRTMIN + 4
# Phases whose single operations can be as slow as loading the model: they get the start-up limit.
LONG_PHASES = frozenset({"start-up", "checkpoint", "final"})
WRITE_EVERY_S = 0.5
SLOW_STEP_FACTOR = 10


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine), ours or another user's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank}.json"


def hang_limit(configured: int | None, long_phase: bool, slowest_step_s: float, startup_s: float) -> tuple[float, str]:
    """(seconds a rank may go without progress, how that figure was found), as the job's message names it."""
    if configured is not None:
        limit, why = float(configured), f"train.hang_timeout_s: {configured}"
    else:
        limit = max(float(AUTO_HANG_FLOOR_S), SLOW_STEP_FACTOR * slowest_step_s, startup_s)
        why = (
            f"train.hang_timeout_s unset: the largest of {AUTO_HANG_FLOOR_S} s, {SLOW_STEP_FACTOR} x the slowest "
            f"step so far ({slowest_step_s:.1f} s) and the start-up ({startup_s:.0f} s)"
        )
    if long_phase and limit < STARTUP_HANG_LIMIT_S:
        limit, why = float(STARTUP_HANG_LIMIT_S), f"{STARTUP_HANG_LIMIT_S} s while starting, checkpointing or writing final/"
    return limit, why


class Heartbeat:
    """This rank's progress, as the watch reads it. `beat` is all the loop pays: a few attribute writes."""

    def __init__(self, run_dir: Path, rank: int, hang_timeout_s: int | None):
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.configured = hang_timeout_s
        self.started = time.time()
        self.rank = rank
        self.phase, self.step, self.micro, self.beats = "start-up", 0, 0, 0
        self.last_advance = self.started
        self.first_step_done = False
        self.startup_s = 0.0
        self.slowest_step_s = 0.0
        self.step_started = self.started
        self._written = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="sharpen-heartbeat", daemon=True)

    def beat(self, phase: str | None = None, step: int | None = None, micro: int | None = None) -> None:
        if phase is not None:
            self.phase = phase
        if step is not None:
            self.step = step
        if micro is not None:
            self.micro = micro
        self.beats += 1
        self.last_advance = time.time()

    def step_done(self, step: int) -> None:
        """Optimizer step `step` has ended: the steps' times make the automatic limit."""
        now = time.time()
        if not self.first_step_done:
            self.first_step_done = True
            self.startup_s = now - self.started  # loading, compiling and the first step, which warms up
        else:
            self.slowest_step_s = max(self.slowest_step_s, now - self.step_started)
        self.step_started = now
        self.beat(step=step, micro=0)

    def snapshot(self) -> dict:
        long_phase = self.phase in LONG_PHASES or not self.first_step_done
        limit, why = hang_limit(self.configured, long_phase, self.slowest_step_s, self.startup_s)
        return {
            "rank": self.rank, "pid": os.getpid(), "parent": os.getppid(), "host": socket.gethostname(),
            "phase": self.phase, "step": self.step, "micro": self.micro, "beats": self.beats,
            "last_advance": self.last_advance, "limit_s": limit, "limit_why": why,
        }  # fmt: skip

    def write(self) -> None:
        state = self.snapshot()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)
        self._written = state["beats"]

    def _write_loop(self) -> None:
        while not self._stop.wait(WRITE_EVERY_S):
            if self.beats != self._written:
                try:
                    self.write()
                except OSError:
                    pass  # a full or vanished run dir: the next write tries again; training goes on

    def start(self) -> None:
        self.write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


_current: Heartbeat | None = None


def start(run_dir: Path, rank: int, hang_timeout_s: int | None) -> Heartbeat:
    """Begin beating for this rank, and answer the watch's STACK_SIGNAL with every thread's stack on stderr
    (the rank's log)."""
    global _current
    faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True)
    _current = Heartbeat(run_dir, rank, hang_timeout_s)
    _current.start()
    return _current


def beat(phase: str | None = None, step: int | None = None, micro: int | None = None) -> None:
    """Progress: the loop, generation and evaluation call it as they go. Nothing where no beat was started."""
    if _current is not None:
        _current.beat(phase, step, micro)


def step_done(step: int) -> None:
    if _current is not None:
        _current.step_done(step)


def stop() -> None:
    if _current is not None:
        _current.stop()
