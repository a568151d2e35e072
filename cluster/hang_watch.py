"""The hang watch: in the process that starts a node's ranks, find a run that stopped moving, say where each
rank is waiting, and stop it, instead of leaving it to a collective timeout that says nothing.

Each rank writes its progress to RUN/logs/heartbeat/rank-N.json (training/heartbeat.py), with the limit
its next beat must come within. When none of this process's ranks has beaten within its limit, the watch
asks each for its Python stack (a real-time signal: faulthandler writes every thread's stack into the rank's log),
reads the main thread's innermost frame and sharpen's own frame from it, keeps that as the report
`launch` prints, and kills the ranks. The checkpoints are left alone: the newest complete one is where
`sharpen resume` continues.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.heartbeat import HEARTBEAT_DIR, STACK_SIGNAL, pid_alive

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 1.0
DUMP_WAIT_S = 5.0
STACK_MARKER = "sharpen: hang watch: no progress; every thread's Python stack follows"
_FRAME = re.compile(r'^\s+File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
# Where torch, DDP and DeepSpeed call (or wait for) their collectives from Python.
COLLECTIVE_PATHS = (
    "torch/distributed/", "torch/nn/parallel/distributed.py", "deepspeed/comm/",
    "deepspeed/runtime/zero/partition_parameters.py",
)  # fmt: skip
# Decorators' frames, which say nothing of where a stack is.
WRAPPERS = frozenset({"wrapper", "wrapped_fn", "decorate_context", "_fn", "inner", "_call_impl", "_wrapped_call_impl"})
CALLERS_SHOWN = 3
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ ")


@dataclass(frozen=True)
class Frame:
    path: str
    line: int
    func: str

    @property
    def short(self) -> str:
        """The path a reader recognises: inside sharpen, or inside its library, with the line."""
        path = self.path
        if "site-packages/" in path:
            path = path.rsplit("site-packages/", 1)[1]
        elif path.startswith(str(ROOT) + os.sep):
            path = path[len(str(ROOT)) + 1 :]
        return f"{path}:{self.line}"

    @property
    def is_sharpen(self) -> bool:
        return self.path.startswith(str(ROOT) + os.sep) and "site-packages" not in self.path

    @property
    def is_collective(self) -> bool:
        return any(part in self.path for part in COLLECTIVE_PATHS)


def parse_threads(dump: str) -> list[list[Frame]]:
    """faulthandler's dump as threads, each its frames innermost first."""
    threads: list[list[Frame]] = []
    for line in dump.splitlines():
        if _THREAD.match(line):
            threads.append([])
        elif (match := _FRAME.match(line)) and threads:
            threads[-1].append(Frame(match["path"], int(match["line"]), match["func"]))
    return threads


def main_thread(threads: list[list[Frame]]) -> list[Frame] | None:
    """The thread that trains: the one running the rank's entry point, else the one a module started
    (the signal may have been taken by any thread, so faulthandler's "Current thread" is not it)."""
    for frames in threads:
        if any(f.func == "main" and f.path.endswith(os.path.join("training", "worker.py")) for f in frames):
            return frames
    return next((frames for frames in threads if frames and frames[-1].func == "<module>"), threads[0] if threads else None)


def describe(frames: list[Frame] | None) -> str:
    """Where a stack waits: its innermost frame, and the sharpen frames that led there."""
    if not frames:
        return "its stack could not be read (see its log)"
    inner = next((f for f in frames if f.func not in WRAPPERS), frames[0])
    callers = [f for f in frames[frames.index(inner) + 1 :] if f.is_sharpen][:CALLERS_SHOWN]
    what = f"waiting in a collective: {inner.func}" if inner.is_collective else f"in {inner.func}"
    return " <- ".join([f"{what} ({inner.short})", *(f"{f.func} ({f.short})" for f in callers)])


def latest_dump(log_path: Path) -> str | None:
    """The text after the last stack marker in a rank's log, once faulthandler has written a thread into it."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    at = text.rfind(STACK_MARKER)
    if at < 0:
        return None
    dump = text[at + len(STACK_MARKER) :]
    return dump if "most recent call first" in dump else None


def _kill(pid: int) -> None:
    """SIGKILL a rank and what it started: the agent starts each rank in a session of its own."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class HangWatch:
    """Watches the ranks this process started (their heartbeat's parent is this pid) from a daemon thread.
    With `own=True` a rank watches itself instead (srun started it: no process of sharpen's above it)."""

    def __init__(
        self, run_dir: Path, expected: int = 1, poll_s: float = POLL_S, own: bool = False,
        on_own_hang: Callable[[str], None] | None = None,
    ):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.poll_s = poll_s
        self.own = own
        self.on_own_hang = on_own_hang
        self.expected = 1 if own else expected
        self._mine: set[Path] = set()
        self.report: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sharpen-hang-watch", daemon=True)

    def __enter__(self) -> HangWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=DUMP_WAIT_S + 5)

    def ranks(self) -> list[dict]:
        """The heartbeats of this process's live ranks. Once all `expected` are found only their files are
        read: on a large job the run dir's filesystem is shared by every node."""
        if len(self._mine) < self.expected:
            paths = sorted((self.run_dir / HEARTBEAT_DIR).glob("rank-*.json"))
        else:
            paths = sorted(self._mine)
        found = []
        for path in paths:
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced (it is written atomically, so this is rare) or left half by a crash
            mine = state.get("pid") == os.getpid() if self.own else state.get("parent") == os.getpid()
            if mine and pid_alive(state["pid"]):
                self._mine.add(path)
                found.append(state)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            ranks = self.ranks()
            now = time.time()
            if ranks and all(now - r["last_advance"] > r["limit_s"] for r in ranks):
                self.stop_hung(ranks, now)
                return

    def stop_hung(self, ranks: list[dict], now: float) -> str:
        """Ask every hung rank for its stack, read it, kill the ranks; returns what the user is told."""
        for r in ranks:
            log_path = self.rank_log(r["rank"])
            with log_path.open("a") as out:
                out.write(f"\n{STACK_MARKER}\n")
            try:
                os.kill(r["pid"], STACK_SIGNAL)
            except ProcessLookupError:
                pass
        dumps: dict[int, str | None] = {}
        deadline = time.monotonic() + DUMP_WAIT_S
        while time.monotonic() < deadline and len(dumps) < len(ranks):
            for r in ranks:
                if r["rank"] not in dumps and latest_dump(self.rank_log(r["rank"])) is not None:
                    time.sleep(0.2)  # the rest of that dump, written by the same handler call
                    dumps[r["rank"]] = latest_dump(self.rank_log(r["rank"]))
            time.sleep(0.1)
        self.report = self.compose(ranks, dumps, now)  # before the kill: the launcher reads it when they are gone
        if self.own:  # this rank: its log (and rank 0's terminal, srun's log) says why, then it ends
            if self.on_own_hang is not None:
                self.on_own_hang(self.report)
            os._exit(1)
        for r in ranks:
            _kill(r["pid"])
        return self.report

    def rank_log(self, rank: int) -> Path:
        return self.run_dir / "logs" / f"rank-{rank}.log"

    def compose(self, ranks: list[dict], dumps: dict[int, str | None], now: float) -> str:
        quiet = min(now - r["last_advance"] for r in ranks)
        limits = {r["limit_why"] for r in ranks}
        lines = [f"error: the run hung: no rank made progress for {quiet:.0f} s ({'; '.join(sorted(limits))})"]
        ordered = sorted(ranks, key=lambda r: (r["step"], r["micro"], r["last_advance"]))
        first = (ordered[0]["step"], ordered[0]["micro"])
        behind = [r for r in ordered if (r["step"], r["micro"]) == first]
        for r in ordered:
            where = describe(main_thread(parse_threads(dumps.get(r["rank"]) or "")))
            at = f"step {r['step']}" + (f", micro-step {r['micro']}" if r["micro"] else "") + f" ({r['phase']})"
            if len(behind) < len(ordered) and r in behind:
                lines.append(f"  rank {r['rank']} stopped first, after {at}: {where}")
            else:
                lines.append(f"  rank {r['rank']} at {at}: {where}")
        lines.append(f"  every thread's stack is at the end of each rank's log: {self.run_dir / 'logs'}/rank-N.log")
        lines.append("  the ranks were stopped; " + self.resume_hint())
        return "\n".join(lines)

    def resume_hint(self) -> str:
        from training.checkpoint import latest_checkpoint

        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return "no checkpoint was written yet"
        return f"the newest complete checkpoint is {latest[1].name}: `sharpen resume {self.run_dir}` continues from it"
