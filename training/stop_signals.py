"""A stop request (USR2, or USR1 or URG: whichever cluster.slurm.signal names) and SIGTERM sent to a rank on
SLURM, remembered for the next step's agreement (training/preemption.py) instead of obeyed at once. No torch
here: training/worker.py installs the handlers before its imports, before it has read which signal the job
names, so all three stop signals ask for the same stop."""

from __future__ import annotations

import signal
import time

# cluster.slurm.signal's choices (launcher/spec.py)
STOP_REQUEST_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1, signal.SIGURG)


class StopSignals:
    def __init__(self):
        self.stop = False  # USR2 (or USR1, URG): checkpoint and requeue
        self.term_at: float | None = None  # SIGTERM's first arrival: checkpoint within the grace period

    def install(self) -> StopSignals:
        for stop in STOP_REQUEST_SIGNALS:
            signal.signal(stop, self._usr2)
        signal.signal(signal.SIGTERM, self._term)
        return self

    def _usr2(self, _signum, _frame) -> None:
        self.stop = True

    def _term(self, _signum, _frame) -> None:
        if self.term_at is None:
            self.term_at = time.time()


STOP_SIGNALS = StopSignals()  # this process's: the worker installs it on SLURM
