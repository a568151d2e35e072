"""USR2 and SIGTERM sent to a rank on SLURM, remembered for the next step's agreement (training/preemption.py)
instead of obeyed at once. No torch here: training/worker.py installs the handlers before its imports."""

from __future__ import annotations

import signal
import time


class StopSignals:
    def __init__(self):
        self.stop = False  # USR2: checkpoint and requeue
        self.term_at: float | None = None  # SIGTERM's first arrival: checkpoint within the grace period

    def install(self) -> StopSignals:
        signal.signal(signal.SIGUSR2, self._usr2)
        signal.signal(signal.SIGTERM, self._term)
        return self

    def _usr2(self, _signum, _frame) -> None:
        self.stop = True

    def _term(self, _signum, _frame) -> None:
        if self.term_at is None:
            self.term_at = time.time()


STOP_SIGNALS = StopSignals()  # this process's: the worker installs it on SLURM
