"""Before a run continues from its run dir: which checkpoint, is it intact, is it this job's."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.plan import Plan

# What decides the meaning of the trained weights: a checkpoint of another value is another job.
IDENTITY_SECTIONS = ("model.path", "model.tokenizer", "finetune", "method")


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(f"{prefix}.{key}", item))
        return out
    return {prefix: value}


def identity_differences(old_job: dict, new_job: dict) -> list[str]:
    """`key: old → new` for every identity key that differs between two dumped jobs."""
    diffs = []
    for section in IDENTITY_SECTIONS:
        head, _, tail = section.partition(".")
        old = old_job.get(head, {}) if not tail else {tail: old_job.get(head, {}).get(tail)}
        new = new_job.get(head, {}) if not tail else {tail: new_job.get(head, {}).get(tail)}
        flat_old, flat_new = _flatten(head, old), _flatten(head, new)
        for key in sorted(set(flat_old) | set(flat_new)):
            if flat_old.get(key) != flat_new.get(key):
                diffs.append(f"{key}: {flat_old.get(key)!r} → {flat_new.get(key)!r}")
    return diffs


def prepare_resume(run_dir: Path, previous: Plan | None, plan: Plan) -> tuple[int, Path] | None:
    """Check what `plan` would resume from in `run_dir`. Returns (step, path) of the newest complete
    checkpoint, or None for a fresh start; raises UserError (exit 2, nothing touched) when it must not go on."""
    from strategies import checkpoint_family
    from training.checkpoint import TRAINER_STATE, incomplete_checkpoints, latest_checkpoint, verify

    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    step, path = latest
    if previous is not None:
        diffs = identity_differences(previous.job, plan.job)
        if diffs:
            raise UserError(
                f"{run_dir} holds checkpoints of another job; these differ from the job that wrote them:\n  "
                + "\n  ".join(diffs),
                "use a new --output-dir for a new job, or resume with the original settings",
            )
    problems = verify(path)
    if problems:
        raise UserError(
            f"checkpoint {path} is damaged, nothing was changed:\n  " + "\n  ".join(problems),
            "move that checkpoint directory aside to resume from the one before it",
        )
    state = json.loads((path / TRAINER_STATE).read_text())
    written_by = state.get("strategy", plan.strategy)
    if checkpoint_family(written_by) != checkpoint_family(plan.strategy):
        raise UserError(
            f"{path} was written by strategy {written_by}, whose checkpoints strategy {plan.strategy} cannot read",
            f"resume with --set strategy.name={written_by}, or export it (`sharpen export`) and start a new run",
        )
    for leftover in incomplete_checkpoints(run_dir):
        print(f"note: ignoring {leftover} (an interrupted save) and removing it", file=sys.stderr)
        shutil.rmtree(leftover, ignore_errors=True)
    return latest
