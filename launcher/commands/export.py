"""`sharpen export`: one checkpoint of a run, consolidated into a Hugging Face model dir or a PEFT adapter dir.

Runs in one process on CPU, without ranks or a process group: it rebuilds the job's module from
RUN/plan.json (the model as trained: PEFT adapters included, never quantised) and fills it from the
checkpoint's shards with the offline reader of the strategy family that wrote them
(strategies/full_weights.py), each read at its fp32 master precision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.errors import UserError

MARKER = "sharpen-export.json"  # in every export dir: it may be overwritten by the next export
DTYPES = ("fp32", "bf16")


def register(sub) -> None:
    """The `export` subcommand's arguments."""
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model or PEFT adapter dir")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, metavar="DIR", help="output dir (new, empty, or a previous export)")
    p.add_argument(
        "--checkpoint", metavar="step-N", help="which checkpoint (default: the newest complete one)"
    )
    p.add_argument("--merge-lora", action="store_true", help="write base + adapter merged as full weights")
    p.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="dtype of the written weights (default fp32)"
    )


def run(args: argparse.Namespace) -> int:
    out = export(Path(args.run_dir), Path(args.to), args.checkpoint, args.merge_lora, args.dtype)
    print(f"exported to {out}", file=sys.stderr)
    return 0


def export(
    run_dir: Path, to: Path, checkpoint: str | None = None, merge_lora: bool = False, dtype: str = "fp32"
) -> Path:
    """Check every input first (UserError on each mistake), then write `to` atomically. Returns `to`."""
    from launcher.plan import Plan

    to = to.absolute()  # `--to .` has a name and a parent to put the temporary dir next to
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    plan = Plan.read(run_dir)
    spec = plan.spec
    peft = spec.finetune.type != "full"
    if merge_lora and not peft:
        raise UserError(
            f"--merge-lora: {run_dir} is a full fine-tune (no adapter to merge)",
            "drop --merge-lora: the export is full weights already",
        )
    step, path = choose_checkpoint(run_dir, checkpoint)
    check_destination(to)
    kind = "merged" if merge_lora else ("adapter" if peft else "full")
    print(
        f"sharpen: exporting {path} ({spec.finetune.type}) as {kind} weights in {dtype} to {to}",
        file=sys.stderr,
    )

    import torch

    from strategies.full_weights import load_full_weights

    model, tokenizer = build_model(spec)
    load_full_weights(model, path, peft)
    tmp = to.with_name(f".{to.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.use_cache = True  # training switches the KV cache off; generation wants it
    if merge_lora:
        model = model.merge_and_unload()
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    marker = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": path.name,
        "step": step,
        "kind": kind,
        "dtype": dtype,
    }
    (tmp / MARKER).write_text(json.dumps({**marker, "sharpen_version": __version__}, indent=2) + "\n")
    replace_dir(tmp, to)
    return to


def choose_checkpoint(run_dir: Path, name: str | None) -> tuple[int, Path]:
    """--checkpoint step-N (or N), else the newest complete checkpoint; refused when damaged."""
    step, path = _find_checkpoint(run_dir, name)
    from training.checkpoint import verify

    problems = verify(path)
    if problems:
        raise UserError(f"checkpoint {path} is damaged:\n  " + "\n  ".join(problems), "export another one with --checkpoint")
    return step, path


def _find_checkpoint(run_dir: Path, name: str | None) -> tuple[int, Path]:
    from training.checkpoint import COMPLETE_MARKER, checkpoints_dir, complete_checkpoints

    complete = complete_checkpoints(run_dir)
    available = ", ".join(p.name for _, p in complete) or "none"
    if name is None:
        if not complete:
            raise UserError(
                f"{run_dir}: no complete checkpoint to export",
                "checkpoints are written every train.save_every steps and at the end of a run",
            )
        return complete[-1]
    path = checkpoints_dir(run_dir) / (f"step-{name}" if name.isdigit() else name)
    if not path.is_dir():
        raise UserError(f"--checkpoint {name}: {path} does not exist", f"complete checkpoints: {available}")
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(
            f"--checkpoint {name}: {path} is incomplete (no {COMPLETE_MARKER} marker: its save was interrupted)",
            f"complete checkpoints: {available}",
        )
    return next((step, p) for step, p in complete if p == path)


def check_destination(to: Path) -> None:
    """Refuse to overwrite anything but an empty dir or an earlier export."""
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to}: is a file, not a directory")
    if to.is_dir() and any(to.iterdir()) and not (to / MARKER).is_file():
        raise UserError(
            f"--to {to}: not empty and not a previous export (no {MARKER}); refusing to overwrite it",
            "choose a new or empty directory",
        )


def build_model(spec) -> tuple[Any, Any]:
    """The module as trained, on CPU in fp32, with its tokenizer. A QLoRA base is loaded unquantised:
    its adapter fits the same base, and merging needs real weights."""
    import torch

    from training.model import load_model, load_tokenizer

    if spec.finetune.type == "qlora":
        spec = spec.model_copy(update={"finetune": spec.finetune.model_copy(update={"type": "lora"})})
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"gradient_checkpointing": "none"})})
    try:
        model = load_model(spec, "fp32", torch.device("cpu"))
        tokenizer = load_tokenizer(spec)
    except OSError as error:  # the base model moved, or the hub cannot be reached
        raise UserError(f"cannot load the run's base model {spec.model.path}: {error}") from None
    return model.eval(), tokenizer


def replace_dir(new: Path, to: Path) -> None:
    """Make `new` visible as `to` by renames; an old export there is removed only afterwards."""
    old = to.with_name(f".{to.name}.export-old")
    shutil.rmtree(old, ignore_errors=True)
    if to.exists():
        os.replace(to, old)
    os.replace(new, to)
    shutil.rmtree(old, ignore_errors=True)


COMMANDS = {"export": run}
