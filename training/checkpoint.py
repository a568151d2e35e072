"""Checkpoint directories: written under a temporary name, made visible by one rename once every rank
has finished and the completion marker exists; only complete ones are ever resumed.

A full disk never leaves a broken one: before writing, rank 0 compares the checkpoint's expected size
(the previous complete one's, else the plan's estimate) with the free space, every rank agrees through
one all-reduce, and all of them raise DiskFullError before anything is written. A full disk met during
the write (another writer filled it) is caught the same way: the partial step-N.tmp is removed, so the
rank's error file and log can still be written. Older checkpoints are pruned only after the new one is
complete, so the previous one is always left intact."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies.base import Strategy
from training import faults
from training.checkpoint_dirs import (  # noqa: F401  (where they were found before)
    COMPLETE_MARKER,
    STEP_DIR,
    checkpoints_dir,
    complete_checkpoints,
    incomplete_checkpoints,
    latest_checkpoint,
)

log = logging.getLogger("sharpen")

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
HASH_LIMIT = 256 * 1024**2  # files up to this size are hashed; larger ones are checked by size
# A write that failed with less than this free on the checkpoint's filesystem failed for want of space:
# torch.save and DCP report ENOSPC as a RuntimeError without the errno ("unexpected pos ...").
FULL_BELOW_BYTES = 1024**2


class DiskFullError(RuntimeError):
    """A checkpoint that does not fit on its filesystem. One line: the launcher shows the last line of a
    rank's error (cluster/local.py report_failure)."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    run_dir: Path,
    step: int,
    strategy: Strategy,
    trainer_state: dict[str, Any],
    keep_last: int,
    extra: Callable[[Path], None] | None = None,
    estimate: int = 0,
) -> Path:
    """Every rank calls this. Returns the final checkpoint path. `extra(directory)`, called on every rank
    before the checkpoint is complete, adds a method's own files (GRPO's generation batch). `estimate`: the
    checkpoint's expected bytes while there is no previous one to measure (Plan.checkpoint_bytes).
    Raises DiskFullError on every rank, with nothing written, when the expected size is more than the free
    space, and on a rank whose write meets a full disk."""
    env = strategy.env
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    needed = free = 0
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        needed, free = expected_bytes(run_dir, estimate), free_bytes(root)
    # Every rank takes the same branch: rank 0's figures, summed with zeros, reach them all.
    figures = torch.tensor([needed, free, float(env.is_main and does_not_fit(needed, free))], dtype=torch.float64)
    needed, free, short = (int(x) for x in strategy.all_reduce_sum(figures.to(env.device)).tolist())
    if short:
        raise DiskFullError(space_message(run_dir, step, needed, free, keep_last))
    try:
        if env.is_main:
            tmp.mkdir(parents=True)
        strategy.barrier()
        faults.maybe_fill_disk("fill-disk-in-save", step, env.rank, tmp / "filler")
        strategy.save_checkpoint(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
        if extra is not None:
            extra(tmp)
        strategy.barrier()  # every shard is on disk before the marker and the rename
        faults.maybe_kill("kill-in-save", step, env.rank)
        if env.is_main:
            meta = {**trainer_state, "step": step, "world_size": env.world_size, "strategy": strategy.name}
            (tmp / TRAINER_STATE).write_text(json.dumps(meta, indent=2) + "\n")
            write_manifest(tmp)
            _fsync_dir(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not out_of_space(exc, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space for this rank's error file and log
        raise DiskFullError(space_message(run_dir, step, needed, free, keep_last, during_write=True)) from exc
    if env.is_main:
        prune(run_dir, keep_last)  # only now: the previous checkpoint stays until this one is complete
    strategy.barrier()
    return final


def checkpoint_size(directory: Path) -> int:
    """Bytes a checkpoint takes on disk: its files' allocated blocks (at least their sizes)."""
    total = 0
    for path in Path(directory).rglob("*"):
        if path.is_file():
            st = path.stat()
            total += max(st.st_size, st.st_blocks * 512)
    return total


def expected_bytes(run_dir: Path, estimate: int) -> int:
    """The next checkpoint's size: the newest complete one's when there is one, else `estimate` (the plan's)."""
    latest = latest_checkpoint(run_dir)
    return checkpoint_size(latest[1]) if latest is not None else estimate


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem of `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def does_not_fit(needed: int, free: int) -> bool:
    return needed > free


def out_of_space(exc: BaseException, directory: Path) -> bool:
    """Whether a failed checkpoint write failed for want of space: ENOSPC or EDQUOT anywhere in the
    exception's chain (DCP's CheckpointException carries each rank's exception), or `directory`'s
    filesystem now (nearly) full, as torch's writers report ENOSPC without its errno."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        stack += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    try:
        return free_bytes(directory) < FULL_BELOW_BYTES
    except OSError:
        return False


def space_message(run_dir: Path, step: int, needed: int, free: int, keep_last: int, during_write: bool = False) -> str:
    """One line: where, how much is needed and free, and what to do."""
    root = checkpoints_dir(run_dir)
    what = "the disk filled up while it was written" if during_write else "it was not written"
    fewer = (f"lower train.keep_last (now {keep_last}: the disk holds keep_last + 1 checkpoints while one is "
             "written), " if keep_last > 1 else "")
    return (
        f"not enough disk space for checkpoint step-{step} in {root}: it needs about {_human(needed)}, "
        f"{_human(free)} {'were' if during_write else 'are'} free ({what}; the previous checkpoint is intact); "
        f"free space there, {fewer}or run in another output dir (--output-dir)"
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def load(path: Path, strategy: Strategy) -> dict[str, Any]:
    """Restore strategy state and this rank's RNG from a complete checkpoint; returns the trainer state."""
    state = json.loads((path / TRAINER_STATE).read_text())
    strategy.load_checkpoint(path)
    rng_file = path / f"rng-rank{strategy.env.rank}.pt"
    if rng_file.is_file() and state.get("world_size") == strategy.env.world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Size (and sha256 up to HASH_LIMIT) of every file of a checkpoint, so damage is found before loading."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER)):
        size = path.stat().st_size
        entry = {"size": size}
        if size <= HASH_LIMIT:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(directory))] = entry
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify(directory: Path) -> list[str]:
    """Problems with a checkpoint's files against its manifest: missing, truncated or changed files."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} is missing"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest} is unreadable ({exc})"]
    problems = []
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{path} has {size} bytes, {entry['size']} were written (truncated or replaced)")
        elif "sha256" in entry and _sha256(path) != entry["sha256"]:
            problems.append(f"{path} does not match the checksum written with it (corrupted)")
    return problems


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted saves."""
    complete = complete_checkpoints(run_dir)
    for _, path in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in incomplete_checkpoints(run_dir):
        log.info("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
