"""Turning a validated job into a ready run dir: plan, resume checks, tokenized data, plan.json."""

from __future__ import annotations

import sys
from pathlib import Path


def prepare_run(
    spec, run_dir: Path, *, device: str | None = None, nnodes: int | None = None, cache_root=None, dry_run: bool = False
):
    """Plan, check an existing run dir, tokenize the data once, write plan.json. Returns the Plan.

    dry_run (`sharpen submit --dry-run`, planned on a machine that may not hold the cluster's files): model
    weights, a tokenizer or data not at hand here are notices, and without them the data is not tokenized
    (the plan's data_cache stays None; a real submit tokenizes)."""
    from launcher.errors import UserError
    from launcher.model_dir import check_model_dir
    from launcher.plan import Plan
    from launcher.planner import build_plan
    from launcher.resume import prepare_resume
    from training.data.cache import prepared_sources
    from training.data.prepare import mixes, prepare_dataset
    from training.methods import TRAINED_KINDS
    from training.trackers import check_extras

    if spec.method.kind not in TRAINED_KINDS:  # before anything is written or tokenized
        raise UserError(
            f"method.kind: this version of sharpen checks and plans {spec.method.kind} jobs, but cannot train them yet",
            f"`sharpen plan` shows the plan; method.kind {', '.join(TRAINED_KINDS)} train today",
        )
    check_extras(spec.logging)  # a tracker's package missing: named now, not by rank 0 after loading the model
    try:
        check_model_dir(spec.model.path)  # a broken model dir is named now, not by every rank minutes later
    except UserError as e:
        if not dry_run:
            raise
        print(f"note: dry run: {e.message} (a real submit refuses this)", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = Plan.read(run_dir) if (run_dir / "plan.json").is_file() else None
    plan, notices = build_plan(spec, run_dir, device=device, nnodes=nnodes)
    for n in notices:
        print(f"note: {n}", file=sys.stderr)
    latest = prepare_resume(run_dir, previous, plan)
    if latest is not None:
        print(f"{run_dir} has a complete checkpoint at step {latest[0]}: resuming from it", file=sys.stderr)
    if dry_run and (missing := inputs_not_at_hand(spec)):
        print(f"note: dry run: not tokenized: {'; '.join(missing)}; a real submit tokenizes first", file=sys.stderr)
        plan.write(run_dir)
        return plan
    # Tokenize here, once, before any rank exists: bad data is a clear error, and no rank waits on a
    # collective while another tokenizes.
    cache = prepare_dataset(
        spec.data,
        spec.method.kind,
        spec.model.tokenizer or spec.model.path,
        trust_remote_code=spec.model.trust_remote_code,
        cache_root=cache_root,
        train_on=getattr(spec.method, "train_on", "all"),
        chat_template=spec.model.chat_template,
    )
    if mixes(spec.data):
        for i, source in enumerate(prepared_sources(cache)):
            if source["samples"] == 0:
                raise UserError(
                    f"data.train[{i}] ({source['path']}): none of its {source['records']} records is left after "
                    "tokenization, so its weight cannot be drawn",
                    "remove it from data.train, or raise data.max_length / set data.truncation: right",
                )
    plan = plan.model_copy(update={"data_cache": str(Path(cache).resolve())})
    plan.write(run_dir)
    return plan


def inputs_not_at_hand(spec) -> list[str]:
    """What tokenizing needs that does not load here: the tokenizer, a hub dataset (local files are checked
    when the job file is read)."""
    import datasets

    from launcher.errors import UserError
    from training.data.cache import load_tokenizer
    from training.data.formats import source_files

    missing = []
    tokenizer = spec.model.tokenizer or spec.model.path
    try:
        load_tokenizer(tokenizer, spec.model.trust_remote_code)
    except UserError:
        missing.append(f"no tokenizer loads from {tokenizer} here")
    for section in ("train", "eval"):
        for i, file in enumerate(getattr(spec.data, section)):
            if source_files(i, file, section) is not None:
                continue
            try:
                datasets.load_dataset_builder(file.path)
            except Exception as e:  # the hub's own errors: offline, not found, gated
                missing.append(f"data.{section}[{i}] ({file.path}) does not load here ({type(e).__name__})")
    return missing
