"""Checkpoint directories: written under a temporary name, made visible by one rename once every rank
has finished and the completion marker exists; only complete ones are ever resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies.base import Strategy
from training import faults

log = logging.getLogger("sharpen")

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
HASH_LIMIT = 256 * 1024**2  # files up to this size are hashed; larger ones are checked by size
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Leftovers of interrupted saves: temporary dirs, and step dirs without the marker."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and (child.name.endswith(".tmp") or not (child / COMPLETE_MARKER).is_file())
    )


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


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
) -> Path:
    """Every rank calls this. Returns the final checkpoint path. `extra(directory)`, called on every rank
    before the checkpoint is complete, adds a method's own files (GRPO's generation batch)."""
    env = strategy.env
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    strategy.barrier()
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
        prune(run_dir, keep_last)
    strategy.barrier()
    return final


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
