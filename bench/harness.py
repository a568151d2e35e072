"""Side-by-side benchmark machinery: timed subprocess runs, interleaved arms, medians, the table and JSON.

Nothing here knows sharpen or Hugging Face: an arm is a name and a function that runs one repeat and
returns a RunResult. bench/arms.py runs sharpen and the HF Trainer on top of this; each bench names its
arms and columns.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """One run of one arm. Step times are seconds since the process started, at the end of each step."""

    arm: str
    repeat: int
    wall_s: float  # process start to exit: imports, model load, training, saving
    first_step_s: float | None  # process start to the first step's line appearing in its step log
    losses: list[float]
    step_times: list[float]
    samples_per_step: list[int]
    tokens_per_step: list[int]  # real tokens (no padding)
    padded_tokens_per_step: list[int] | None = None  # tokens the model computed on, padding included
    window_cpu_s: float | None = None  # CPU seconds of the process tree over the steps after `skip`
    extra: dict = field(default_factory=dict)

    def steady(self, skip: int) -> dict[str, float]:
        """Samples/s and tokens/s over the steps after the first `skip` (start-up and warm-up excluded)."""
        if len(self.step_times) <= skip:
            raise ValueError(f"{self.arm}: {len(self.step_times)} steps, cannot skip {skip}")
        seconds = self.step_times[-1] - self.step_times[skip - 1] if skip else self.step_times[-1]
        rates = {
            "samples_per_s": sum(self.samples_per_step[skip:]) / seconds,
            "tokens_per_s": sum(self.tokens_per_step[skip:]) / seconds,
            "step_ms": 1000 * seconds / (len(self.step_times) - skip),
        }
        if self.padded_tokens_per_step:
            rates["padded_tokens_per_s"] = sum(self.padded_tokens_per_step[skip:]) / seconds
        if self.window_cpu_s:
            rates["cpu_ms_per_step"] = 1000 * self.window_cpu_s / (len(self.step_times) - skip)
            rates["samples_per_cpu_s"] = sum(self.samples_per_step[skip:]) / self.window_cpu_s
        return rates


@dataclass
class Timing:
    """What run_timed measures from outside a process (the same way for every arm)."""

    wall_s: float  # start to exit
    first_step_s: float | None  # start until the step log holds its first line
    # CPU seconds (user + system, the whole process tree) used between the step log reaching
    # `window[0]` and `window[1]` lines, and the wall seconds between those two moments. On a shared
    # machine the CPU seconds are the steadier measure: they do not count time spent waiting for a core.
    window_cpu_s: float | None = None
    window_wall_s: float | None = None


def _tree_cpu_seconds(proc) -> float:
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _line_count(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


POLL_S = 0.01  # how often a watched process's files are looked at


def run_watched(
    cmd: Sequence[str], *, env: dict[str, str], log_file: Path, poll: Callable[[Any], bool],
    cwd: Path | None = None, clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Run `cmd`, its output into `log_file`, while a thread calls `poll(process)` (a psutil.Process)
    every POLL_S until it returns True or the process ends. Returns (start, wall seconds) on `clock`;
    raises with the log's last lines if the process failed."""
    import psutil

    done = threading.Event()
    with log_file.open("w") as log:
        start = clock()
        popen = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)

        def watch() -> None:
            while not done.is_set() and not poll(proc):
                time.sleep(POLL_S)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        returncode = popen.wait()
        wall = clock() - start
    done.set()
    watcher.join()
    if returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd)} exited {returncode}; its output ends with:\n{tail}")
    return start, wall


def run_timed(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    step_log: Path,
    log_file: Path,
    window: tuple[int, int] | None = None,
    cwd: Path | None = None,
) -> Timing:
    """Run `cmd` and time it from outside: wall time, time to the first line of `step_log` (one line per
    optimizer step), and CPU seconds of the process tree over the steps in `window`.

    The step log is polled every POLL_S from a thread; the error is a poll interval at each end.
    """
    marks: dict[str, float] = {}

    def poll(proc) -> bool:
        lines = _line_count(step_log)
        now = time.perf_counter()
        if lines and "first" not in marks:
            marks["first"] = now
        if window and lines >= window[0] and "cpu_a" not in marks:
            marks["cpu_a"], marks["t_a"] = _tree_cpu_seconds(proc), now
        if window and lines >= window[1] and "cpu_b" not in marks:
            marks["cpu_b"], marks["t_b"] = _tree_cpu_seconds(proc), now
            return True
        return False

    start, wall = run_watched(cmd, env=env, log_file=log_file, poll=poll, cwd=cwd)
    timing = Timing(wall_s=wall, first_step_s=marks["first"] - start if "first" in marks else None)
    if "cpu_b" in marks:
        timing.window_cpu_s = marks["cpu_b"] - marks["cpu_a"]
        timing.window_wall_s = marks["t_b"] - marks["t_a"]
    return timing


def interleave(arms: Sequence[tuple[str, Callable[[int], RunResult]]], repeats: int, report=print) -> list[RunResult]:
    """A B A B ...: each repeat runs every arm once, in the given order, so slow drifts of the machine
    (other jobs, thermal state) fall on every arm alike."""
    results = []
    for repeat in range(repeats):
        for name, run in arms:
            result = run(repeat)
            results.append(result)
            report(f"  repeat {repeat + 1}/{repeats} {name:<8} wall {result.wall_s:6.1f} s")
    return results


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / |b_i| over two curves of the same length."""
    if len(a) != len(b):
        raise ValueError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a metric over repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def spread_cell(stat: dict[str, float], fmt: str) -> str:
    """A table cell "median (min-max)" of a spread(), each number in format `fmt`."""
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def median_cell(values: Sequence[float | None], fmt: str) -> str:
    """spread_cell of the values that are numbers (None and NaN left out); "-" where none is."""
    numbers = [v for v in values if v is not None and v == v]
    return spread_cell(spread(numbers), fmt) if numbers else "-"


def aligned_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows as lines of columns two spaces apart, the first column left-aligned and the others
    right-aligned, with a rule under the first row (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int | float | None]:
    from importlib.metadata import version

    import torch

    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def results_as_dicts(results: Sequence[RunResult]) -> list[dict]:
    return [asdict(r) for r in results]

