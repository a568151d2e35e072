"""Run a function on N real ranks (spawned processes, gloo on CPU) and collect what each returns."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

# The children's environment from their first import on: one thread per rank (2 cores shared with
# other test runs) and DeepSpeed's CPU accelerator.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}


def _worker(rank: int, world_size: int, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    from strategies.base import DistEnv

    # Each rank's output goes to its own log, shown only when that rank fails.
    log = open(Path(out_dir) / f"rank{rank}.log", "w")  # lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    # A file store in this run's own temp dir: no TCP port to collide with other test runs.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/store",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size)
    try:
        result: Any = fn(env, *args)
    except BaseException:
        result = RankError(rank, traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # The result is saved: leave without the interpreter's teardown, where a library's C++ thread still
    # joinable at exit aborts the process ("terminate called without an active exception") and would fail
    # a spawn whose every rank finished.
    log.flush()
    os._exit(0)


class RankError:
    """An exception raised on a rank, carried back to the parent as its traceback text."""

    def __init__(self, rank: int, text: str):
        self.rank, self.text = rank, text

    def __repr__(self) -> str:
        return f"rank {self.rank} failed:\n{self.text}"


def run(fn: Callable, world_size: int, *args: Any, timeout: float = 300) -> list[Any]:
    """`fn(env, *args)` on `world_size` ranks; returns each rank's result (a RankError if it raised).

    `fn` must be importable by module path (a top-level function), as spawn pickles it by name."""
    saved = {key: os.environ.get(key) for key in CHILD_ENV}
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ.update(CHILD_ENV)  # only while spawning: the children copy it, this process keeps its own
        try:
            ctx = mp.start_processes(
                _worker,
                args=(world_size, out_dir, fn, args),
                nprocs=world_size,
                join=False,
                start_method="spawn",
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in ctx.processes:
                        process.kill()
                    raise TimeoutError(
                        f"{getattr(fn, '__name__', fn)} on {world_size} ranks took over {timeout}s"
                    )
        except Exception as error:  # a rank died (or hung): its log says why
            logs = "\n".join(_log_tail(out_dir, r) for r in range(world_size))
            raise RuntimeError(f"{error}\n{logs}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_each(env, jobs: dict[str, Any], run_one: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """`run_one(env, job)` for every job on this rank, in one process group: a job that fails is reported
    as that job's RankError, not the whole batch's."""
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = run_one(env, job)
        except Exception:
            results[name] = RankError(env.rank, f"job {name}:\n{traceback.format_exc()}")
    return results


def _log_tail(out_dir: str, rank: int, chars: int = 4000) -> str:
    path = Path(out_dir) / f"rank{rank}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- rank {rank} log (tail) ---\n{text[-chars:]}"


def unwrap(results: list[Any]) -> list[Any]:
    """Raise with every rank's traceback if any rank failed."""
    errors = [r for r in results if isinstance(r, RankError)]
    if errors:
        raise AssertionError("\n".join(map(repr, errors)))
    return results


def job_result(results: list[dict], name: str, rank: int = 0) -> Any:
    """Job `name`'s result on `rank` from a run_each spawn; the test fails with that rank's traceback if the
    job raised there."""
    import pytest

    value = results[rank][name]
    if isinstance(value, RankError):
        pytest.fail(repr(value), pytrace=False)
    return value
