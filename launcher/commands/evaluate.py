"""`sharpen eval SOURCE --tasks NAMES`: lm-evaluation-harness tasks on a trained model, a table and a JSON file.

The model is the one launcher/source.py loads (a run's adapter as sharpen trained it, modules_to_save
included), handed to lm-eval's HFLM as an instance, so lm-eval never loads weights itself. Task names are
checked against lm-eval's task index before the model loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.source import add_source_arguments, check_source, source_from_args

INSTALL = "pip install 'sharpen[eval]'"


def register(sub) -> None:
    """The `eval` subcommand's arguments."""
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a run's model (or any model)")
    add_source_arguments(p)
    p.add_argument("--tasks", required=True, metavar="NAMES", help="lm-eval task names, comma-separated (e.g. hellaswag)")
    p.add_argument("--limit", type=float, metavar="N", help="at most N examples per task (a fraction if < 1)")
    p.add_argument("--out", metavar="results.json",
                   help="the results as JSON (default: RUN/eval/results.json for a run dir, else none)")
    p.add_argument("--include-path", metavar="DIR", help="a dir of your own task YAMLs, beside lm-eval's")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests scored together (8)")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--apply-chat-template", action="store_true", help="format requests with the model's chat template")


def lm_eval_module():
    """lm_eval, or the UserError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("sharpen eval needs lm-evaluation-harness (the lm-eval package)", INSTALL) from None
    return lm_eval


def task_manager(names: list[str], include_path: str | None, include_defaults: bool = True):
    """lm-eval's TaskManager that knows every name in `names`: the include path's tasks alone when they are
    all there (lm-eval's own index of ~15,000 tasks takes a while to build), else with lm-eval's.
    An unknown name is a UserError listing the closest known names."""
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        if include_path is not None:
            if not Path(include_path).is_dir():
                raise UserError(f"--include-path {include_path}: no such directory")
            local = TaskManager(include_path=include_path, include_defaults=False)
            if all(name in local.all_tasks for name in names) or not include_defaults:
                manager = local
            else:
                manager = TaskManager(include_path=include_path)
        else:
            manager = TaskManager(include_defaults=include_defaults)
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            where = f"in lm-eval's tasks or {include_path}" if include_path else "in lm-eval's tasks"
            raise UserError(
                f"--tasks: unknown task {name!r} {where}" + (f"; close names: {', '.join(close)}" if close else ""),
                "`lm-eval ls tasks` lists them all; your own YAMLs go in a dir given as --include-path",
            )
    return manager


@contextmanager
def quiet_lm_eval():
    """lm-eval's logger at ERROR for a span: its warnings are about its own CLI's options, not sharpen's."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks: no task names given", "e.g. --tasks hellaswag,arc_easy")
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
        raise UserError("--batch-size must be >= 1 and --limit > 0")
    check_source(args.source, args.checkpoint, args.adapter)
    manager = task_manager(names, args.include_path)
    source = source_from_args(args)
    print(f"sharpen: evaluating {source.describe}; tasks: {', '.join(names)}", file=sys.stderr)
    results = evaluate(source, names, manager, args)
    print(format_table(results))
    out = Path(args.out) if args.out else (source.run_dir / "eval" / "results.json" if source.run_dir else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
        print(f"sharpen: results in {out}", file=sys.stderr)
    return 0


def evaluate(source, names: list[str], manager, args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's simple_evaluate of the loaded model; its results without the per-sample logs."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    with quiet_lm_eval():  # its notes on a model passed as an instance, and on each task
        lm = HFLM(pretrained=source.model, tokenizer=source.tokenizer, batch_size=args.batch_size)
        results = simple_evaluate(
            model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, apply_chat_template=args.apply_chat_template, bootstrap_iters=1000,
        )
    if results is None:  # a non-zero rank of a multi-process launch: not how sharpen eval runs
        raise UserError("lm-eval returned no results")
    results.pop("samples", None)
    results["sharpen"] = {"source": source.describe, "tasks": names, "limit": args.limit}
    return results


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every metric lm-eval reported, tasks in its order."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():  # "acc,none": the metric, after the filter "none"
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name in ("", "none") else f"{metric} ({filter_name})"
            rows.append((task, label, float(value), float(stderr) if isinstance(stderr, int | float) else None))
    return rows


def format_table(results: dict[str, Any]) -> str:
    """The results as an aligned text table: task, metric, value, stderr."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metric, value, stderr in result_rows(results):
        err = "" if stderr is None or math.isnan(stderr) else f"{stderr:.4f}"
        rows.append((task, metric, f"{value:.4f}", err))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )


def _jsonable(value: Any) -> Any:
    """numpy scalars and sets as JSON (lm-eval's results hold both); anything else as its text."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set):
        return sorted(value, key=str)
    return str(value)


COMMANDS = {"eval": run}
