"""Moving a DeepSpeed checkpoint to another world size through DeepSpeed's universal checkpoint format.

ZeRO cuts its flat optimizer partitions for one world size. `deepspeed.checkpoint.ds_to_universal`
rewrites them as one folder per parameter (fp32 master weight, exp_avg, exp_avg_sq, step), which
any world size reads back with the engine's `checkpoint.load_universal`. The conversion is written
once, next to the checkpoint it came from, and reused by every later resume (any world size):

    step-N/deepspeed/                  what the engine saved (one optimizer partition per rank)
    step-N/universal/latest_universal  written by the conversion
    step-N/universal/deepspeed/        mp_rank_00_model_states.pt (or one per rank for ZeRO-3), zero/<param>/*.pt
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("sharpen")

UNIVERSAL_DIR = "universal"
# Converting in worker processes would fork a rank that holds a process group's threads; the
# conversion reads and writes files, so one process does it and the I/O is the bound anyway.
CONVERSION_WORKERS = 1
FAILED_SUFFIX = ".failed"


def universal_dir(checkpoint: Path) -> Path:
    return Path(checkpoint) / UNIVERSAL_DIR


def convert(checkpoint: Path, tag: str) -> Path:
    """Convert `checkpoint/tag` (any ZeRO stage, any world size) into `checkpoint/universal/`, once.

    Written under a temporary name and made visible by one rename, so a crash mid-conversion leaves
    nothing that looks complete. Needs no process group: a launcher or a single rank can call it."""
    from deepspeed.checkpoint import ds_to_universal

    checkpoint = Path(checkpoint)
    final = universal_dir(checkpoint)
    if (final / tag).is_dir():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    args = Namespace(
        input_folder=str(checkpoint / tag),
        output_folder=str(tmp / tag),
        num_extract_workers=CONVERSION_WORKERS,
        num_merge_workers=CONVERSION_WORKERS,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints of a plain (not Megatron) module carry no universal-checkpoint info;
        # the converter adds the version key, which is all such a module needs.
        inject_missing_state=True,
    )
    started = time.monotonic()
    with contextlib.redirect_stdout(_LogWriter()):
        ds_to_universal.main(args)
    os.replace(tmp, final)
    log.info("converted %s to a universal checkpoint in %.1fs", checkpoint / tag, time.monotonic() - started)
    return final


def convert_on_main_rank(
    checkpoint: Path, tag: str, is_main: bool, barrier: Callable[[], None], poll_s: float = 0.5
) -> Path:
    """Rank 0 converts; the others wait for the finished folder by watching the file system.

    Waiting on a file, not in a collective: converting a large model can outlast the process group's
    collective timeout. If rank 0 fails it leaves `universal.failed` with the reason, which the waiting
    ranks raise instead of waiting forever. The closing barrier holds rank 0 until every rank has
    seen the folder: where one cannot (no shared file system) the collective timeout ends the run."""
    final = universal_dir(checkpoint)
    failed = final.with_name(final.name + FAILED_SUFFIX)
    if is_main:
        failed.unlink(missing_ok=True)
    barrier()  # no rank reads a failure left by an earlier attempt
    if is_main:
        try:
            convert(checkpoint, tag)
        except BaseException as error:
            failed.write_text(f"{type(error).__name__}: {error}\n")
            raise
    while not (final / tag).is_dir():
        if failed.is_file():
            raise RuntimeError(
                f"rank 0 could not convert {checkpoint} to a universal checkpoint: {failed.read_text()}"
            )
        time.sleep(poll_s)
    barrier()
    return final


@contextlib.contextmanager
def loading_universal(engine: Any) -> Iterator[None]:
    """The engine's `checkpoint.load_universal` switched on for one `load_checkpoint` call.

    DeepSpeed reads that setting only while loading, so turning it on here is the same as having
    written it into the config at initialize, without knowing at setup what the resume will find."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


class _LogWriter:
    """The converter prints its progress: send it to the log instead of the terminal."""

    def write(self, text: str) -> int:
        if text.strip():
            log.info("ds_to_universal: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass
