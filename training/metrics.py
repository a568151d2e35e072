"""Rank 0's outputs about the run: metrics.jsonl, the progress bar and W&B."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("sharpen")

WANDB_ID_FILE = "wandb_id"


class MetricsLog:
    """Appends one JSON object per logged step to RUN/metrics.jsonl. A resumed run first drops rows past
    the step it resumes from, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if path.exists():
            kept = [
                line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """A rich progress bar on the user's terminal (rank 0 only): step, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, start: int, stream: IO[str] | None, enabled: bool = True):
        self._progress = None
        if not enabled or stream is None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        console = Console(file=stream, force_terminal=stream.isatty() if hasattr(stream, "isatty") else False)
        self._progress = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")
        self._progress.start()

    def update(self, step: int, row: dict[str, Any] | None) -> None:
        if self._progress is None:
            return
        stats = self._progress.tasks[0].fields.get("stats", "")
        if row is not None:
            stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
            if row.get("mfu") is not None:
                stats += f"  MFU {100 * row['mfu']:.1f}%"
            for short, names in (("margin", ("rewards/margin", "margin")), ("acc", ("rewards/accuracy", "accuracy"))):
                value = next((row[n] for n in names if n in row), None)  # DPO, reward models
                if value is not None:
                    stats += f"  {short} {value:.3f}"
        self._progress.update(self._task, completed=step, stats=stats)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class WandbRun:
    """W&B when the job asks for it. The API key comes from the environment only (never plan.json);
    the run id is kept in the run dir so a resumed job continues the same W&B run."""

    def __init__(self, run_dir: Path, settings: dict[str, Any] | None, config: dict[str, Any]):
        self._run = None
        if not settings or settings.get("mode") == "disabled":
            return
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity"),
            name=settings.get("name") or run_dir.name,
            tags=settings.get("tags") or None,
            mode=settings.get("mode", "online"),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
        )

    @property
    def id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def log(self, row: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of one step as a W&B table (GRPO's completions); nested values as JSON text."""
        if self._run is None or not rows:
            return
        import json

        import wandb

        columns = list(rows[0])
        data = [[json.dumps(v) if isinstance(v, (dict, list)) else v for v in (row.get(c) for c in columns)] for row in rows]
        self._run.log({key: wandb.Table(columns=columns, data=data)}, step=step)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resume continues this W&B run."""
        return {"wandb_id": self.id}

    def finish(self, status: str = "FINISHED") -> None:
        """End the W&B run (the status is the other trackers'; W&B reads the process's exit)."""
        if self._run is not None:
            self._run.finish()


class Throughput:
    """Tokens and samples per second between two logged steps (wall clock, after the step completed)."""

    def __init__(self):
        self.start = time.perf_counter()
        self._last_t = self.start
        self._tokens = 0
        self._samples = 0

    def add(self, tokens: int, samples: int) -> None:
        self._tokens += tokens
        self._samples += samples

    def rates(self) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        rates = self._tokens / dt, self._samples / dt
        self._last_t, self._tokens, self._samples = now, 0, 0
        return rates

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
