"""Which checkpoints a run dir holds and which are complete: torch-free, so that `sharpen status` and
`sharpen runs` read them without importing torch (training/checkpoint.py writes and reads them)."""

from __future__ import annotations

import re
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"
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
