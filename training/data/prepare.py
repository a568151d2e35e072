"""Tokenizing a job's data: files → encoded samples (shifted labels, truncation, pairs, prompts) → packed rows,
with the evaluation rows held out or encoded beside them, into the tokenize-once cache (cache.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

import numpy as np

from launcher.errors import UserError
from launcher.spec import DataFile, DataSpec, mixing
from training.data.cache import (
    DEFAULT_ROOT,
    EVAL_DIR,
    EVAL_SPLIT_SEED,
    META_FILE,
    PIPELINE_VERSION,
    build_once,
    cache_key,
    load_tokenizer,
)
from training.data.formats import (
    FORMATS,
    Encoder,
    RecordError,
    load_source,
    map_columns,
    record_location,
    source_files,
)
from training.data.packing import COLUMNS, DESIRABLE, IGNORE_INDEX, pack_dataset, row_features
from training.data.prompts import PROMPT_COLUMNS, finish_prompt, prompt_features
from training.data.templates import load_chat_template

logger = logging.getLogger(__name__)

# A file is split across processes only in pieces of at least this many records: starting a worker process
# costs about a second, more than a smaller piece takes to tokenize.
MIN_RECORDS_PER_PROC = 2000
BATCH = 1000  # records per tokenizer call, and rows per Arrow write: memory stays bounded by it
STAT_KEYS = ("truncated", "dropped_too_long", "dropped_no_labels")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as SLURM and taskset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def processes_for(records: int, num_proc: int | None) -> int:
    """How many processes tokenize a file of `records`: data.num_proc (default the cores), fewer for small files."""
    return max(1, min(num_proc or available_cores(), records // MIN_RECORDS_PER_PROC))


def prepare_dataset(
    data: DataSpec,
    method_kind: str,
    tokenizer_path: str,
    *,
    trust_remote_code: bool = False,
    cache_root: str | Path | None = None,
    train_on: str = "completion",
    chat_template: str | None = None,
) -> Path:
    """Tokenize data.train once into the shared cache and return its directory (a finished one is reused).

    Many processes may call this at once on a shared filesystem: one takes the lock file and builds into
    a temporary directory that it renames into place; the others poll for that directory. No collective.
    Evaluation rows (data.eval files, data.eval_split held out of train) go into its `eval/` directory.
    `chat_template` is model.chat_template (a built-in name or a .jinja path), in place of the tokenizer's.
    """
    files = (*data.train, *data.eval)
    # Rows a loss finds its sequences in by where their positions restart: a preference pair is
    # [chosen, rejected] end to end and a micro-batch lays its pairs in one row; KTO's loss is per
    # completion, one row each with its own label, found as DPO finds its pairs.
    one_forward_rows = (
        ("paired", "preference pairs are not packed (each pair is already one row of chosen and rejected, laid end to end)",
         "preference pairs: chosen and rejected of every pair go through one padding-free forward"),
        ("labelled", "feedback records are not packed (each completion is judged on its own, one row each)",
         "feedback records: a micro-batch's completions go through one padding-free forward"),
    )
    for flag, not_packed, one_forward in one_forward_rows:
        if any(getattr(FORMATS[f.format], flag) for f in files):
            if data.packing:
                raise UserError(f"data.packing: {not_packed}", hint="remove data.packing")
            if not data.padding_free:
                raise UserError(f"data.padding_free: false does not apply to {one_forward}", hint="remove data.padding_free")
    if data.packing and any(FORMATS[f.format].prompts_only for f in files):
        raise UserError("data.packing: prompts are not packed (each is generated from on its own)",
                        hint="remove data.packing")
    template = load_chat_template(chat_template) if chat_template else None
    root = Path(cache_root or data.cache_dir or DEFAULT_ROOT).expanduser()
    final = root / cache_key(data, method_kind, tokenizer_path, train_on, trust_remote_code, template)
    return build_once(final, lambda out: _build(out, data, tokenizer_path, trust_remote_code, train_on, template))


# ---------------------------------------------------------------- tokenizing


def _finish_sample(ids: list[int], targets: list[bool], max_length: int, truncation: str, stats: dict):
    """Truncate or drop, then shift: labels[i] = ids[i+1] where that token is a target, -100 elsewhere."""
    if len(ids) > max_length:
        if truncation == "drop":
            stats["dropped_too_long"] += 1
            return None
        ids, targets = ids[:max_length], targets[:max_length]
        stats["truncated"] += 1
    shifted = np.asarray(targets[1:], dtype=bool)
    labels = np.where(shifted, np.asarray(ids[1:], dtype=np.int64), IGNORE_INDEX).tolist() + [IGNORE_INDEX]
    n_labels = int(shifted.sum())
    if not n_labels:
        stats["dropped_no_labels"] += 1
        return None
    return [ids, labels, [len(ids)], len(ids), n_labels, 1]


def _finish_pair(chosen, rejected, max_length: int, truncation: str, stats: dict):
    """One row of two segments, chosen then rejected, each finished as a sample; dropped with either."""
    scratch = dict.fromkeys(stats, 0)
    finished = [_finish_sample(ids, targets, max_length, truncation, scratch) for ids, targets in (chosen, rejected)]
    if None in finished:
        reason = "dropped_too_long" if scratch["dropped_too_long"] else "dropped_no_labels"
        stats[reason] += 1
        return None
    stats["truncated"] += bool(scratch["truncated"])
    (c_ids, c_labels, *_), (r_ids, r_labels, *_) = finished
    n_labels = finished[0][4] + finished[1][4]
    return [c_ids + r_ids, c_labels + r_labels, [len(c_ids), len(r_ids)], len(c_ids) + len(r_ids), n_labels, 2]


def _encode_source(
    ds, i: int, file: DataFile, path: Path | None, tokenizer, train_on: str, data: DataSpec, stats: dict, out: Path,
    section: str = "train",
):
    """Encode one source file; the Arrow output goes to `out` (each part its own file, never HF's cache)."""
    fmt, enc = FORMATS[file.format], Encoder.for_file(tokenizer, train_on, file)
    label = f"data.{section}[{i}] ({path or file.path})"
    ds = map_columns(ds, file, label)
    missing = [c for c in fmt.required(file.field) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{label}: the records have no field {', '.join(repr(c) for c in missing)} "
            f"(format: {file.format}); their fields are {', '.join(ds.column_names) or 'none'}",
            hint=f"a valid {file.format} record: {fmt.example_line()}",
        )

    if fmt.prompts_only:
        names, features = PROMPT_COLUMNS, prompt_features()
    else:
        names, features = ((*COLUMNS, DESIRABLE) if fmt.labelled else COLUMNS), row_features(fmt.labelled)

    stats_file = out / f"stats-{uuid.uuid4().hex}.jsonl"

    def encode(batch: dict, indices: list[int]) -> dict:
        counts = dict.fromkeys(STAT_KEYS, 0)  # this batch's; summed from stats_file (the workers' too)
        try:
            encoded = fmt.encode(batch, enc)
        except RecordError as e:
            where = "" if e.index is None else record_location(path, indices[e.index]) + ": "
            example = f"a valid {file.format} record: {fmt.example_line()}"
            raise UserError(f"{label}: {where}{e.message}", hint=example) from None
        columns: dict[str, list] = {c: [] for c in names}
        for item in encoded:
            if fmt.prompts_only:
                sample = finish_prompt(*item, data.max_length, data.truncation, counts)
            elif fmt.paired:
                sample = _finish_pair(*item, data.max_length, data.truncation, counts)
            elif fmt.labelled:
                (ids, targets), desirable = item
                sample = _finish_sample(ids, targets, data.max_length, data.truncation, counts)
                sample = sample and [*sample, desirable]
            else:
                sample = _finish_sample(*item, data.max_length, data.truncation, counts)
            if sample:
                for column, value in zip(names, sample, strict=True):
                    columns[column].append(value)
        with open(stats_file, "a") as f:  # one short line per append: whole even with several writers
            f.write(json.dumps(counts) + "\n")
        return columns

    num_proc = processes_for(len(ds), data.num_proc)
    if num_proc > 1:  # the workers are forked: the tokenizer's own threads would only contend with them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoded = ds.map(
        encode, batched=True, batch_size=BATCH, writer_batch_size=BATCH, with_indices=True,
        remove_columns=ds.column_names, features=features, num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=str(out / f"encoded-{uuid.uuid4().hex}.arrow"), new_fingerprint=uuid.uuid4().hex,
        desc=f"tokenizing data.{section}[{i}] {path.name if path else file.path}",
    )
    if stats_file.exists():
        for line in stats_file.read_text().splitlines():
            for key, n in json.loads(line).items():
                stats[key] += n
    return encoded


def _build(
    out: Path, data: DataSpec, tokenizer_path: str, trust_remote_code: bool, train_on: str, template: str | None
) -> None:
    import datasets

    work = out.parent / "work"
    work.mkdir(parents=True)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    if sys.stderr.isatty():  # the user's terminal: records/s and the time left, per file
        datasets.utils.logging.enable_progress_bar()
    else:
        datasets.utils.logging.disable_progress_bar()
    try:
        tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        if template is not None:
            tokenizer.chat_template = template
        stats = {"records": 0, **dict.fromkeys(STAT_KEYS, 0)}
        parts, records = _encode_section("train", data, tokenizer, train_on, stats, work)
        ds = datasets.concatenate_datasets(parts)
        if len(ds) == 0:
            raise UserError(
                f"no training samples left out of {stats['records']} records: "
                f"{stats['dropped_too_long']} longer than data.max_length ({data.max_length}) with truncation: drop, "
                f"{stats['dropped_no_labels']} with no token to learn from",
                hint="raise data.max_length, set data.truncation: right, or check the records' completions",
            )
        source_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])  # each sample's data.train entry
        eval_parts, eval_stats = [], dict.fromkeys(stats, 0)
        if data.eval_split:
            ds, held_out, kept = _hold_out(ds, data.eval_split)
            source_of = source_of[kept]
            eval_parts.append(held_out)
        if data.eval:
            eval_parts.append(datasets.concatenate_datasets(_encode_section("eval", data, tokenizer, train_on, eval_stats, work)[0]))
        samples = np.bincount(source_of, minlength=len(parts))
        lengths = np.asarray(ds.with_format("arrow")["length"]).astype(np.int64)
        tokens = np.bincount(source_of, weights=lengths, minlength=len(parts)).astype(np.int64)
        rows = samples.tolist()
        if data.packing and mixes(data):  # each source packed apart: a row holds one source's samples
            bounds = np.cumsum([0, *samples])
            packed = []
            for s in range(len(parts)):
                (work / f"source-{s}").mkdir()
                packed.append(pack_dataset(ds.select(range(bounds[s], bounds[s + 1])), data.max_length, work / f"source-{s}"))
            ds, rows = datasets.concatenate_datasets(packed), [len(p) for p in packed]
        elif data.packing:
            ds, rows = pack_dataset(ds, data.max_length, work), None  # one pool: rows mix the sources
        ds.save_to_disk(str(out))
        eval_rows = _save_eval(eval_parts, data, out, work) if eval_parts else 0
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
        else:
            datasets.utils.logging.disable_progress_bar()
    dropped = stats["dropped_too_long"] + stats["dropped_no_labels"]
    if dropped or stats["truncated"]:
        logger.warning(
            "data: dropped %d of %d records (%d longer than max_length %d, %d with no label token); truncated %d",
            dropped, stats["records"], stats["dropped_too_long"], data.max_length, stats["dropped_no_labels"],
            stats["truncated"],
        )
    sources = [
        {"path": f.path, "records": records[s], "samples": int(samples[s]), "tokens": int(tokens[s]),
         "rows": None if rows is None else int(rows[s])}
        for s, f in enumerate(data.train)
    ]  # fmt: skip
    meta = {
        "pipeline_version": PIPELINE_VERSION, "rows": len(ds), "stats": stats,
        "tokens": _total(ds, "length"),
        "label_tokens": _total(ds, "num_label_tokens"),  # none in prompt rows: nothing is trained on a prompt
        "sources": sources,
        "tokenizer": tokenizer_path, "train_on": train_on, "data": data.model_dump(),
    }
    if eval_rows:
        meta |= {"eval_rows": eval_rows, "eval_stats": eval_stats}
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: it marks the entry finished


def mixes(data: DataSpec) -> bool:
    """Whether data.train's weights mix its sources (each then drawn at its own share: training/data/sampler.py)."""
    return mixing([f.weight for f in data.train])


def _total(ds, column: str) -> int:
    return int(np.asarray(ds.with_format("arrow")[column]).sum()) if column in ds.column_names else 0


def _encode_section(section: str, data: DataSpec, tokenizer, train_on: str, stats: dict, work: Path):
    """Every entry of data.train or data.eval encoded (one dataset each, its files in order), and each entry's
    number of records."""
    import datasets

    parts, records = [], []
    for i, file in enumerate(getattr(data, section)):
        pieces, count = [], 0
        for path in source_files(i, file, section) or [None]:
            raw = load_source(i, file, path, work, section)
            count += len(raw)
            pieces.append(_encode_source(raw, i, file, path, tokenizer, train_on, data, stats, work, section))
        stats["records"] += count
        parts.append(datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0])
        records.append(count)
    return parts, records


def _hold_out(ds, share: float):
    """(train, held out, the kept samples' indices): data.eval_split of the samples, chosen by a fixed seed,
    each part in file order."""
    n = len(ds)
    n_eval = max(1, round(n * share))
    if n_eval >= n:
        raise UserError(f"data.eval_split {share} of {n} samples leaves none to train on", hint="lower data.eval_split")
    held = np.sort(np.random.default_rng(EVAL_SPLIT_SEED).permutation(n)[:n_eval])
    keep = np.setdiff1d(np.arange(n), held)
    return ds.select(keep), ds.select(held), keep


def _save_eval(parts: list, data: DataSpec, out: Path, work: Path) -> int:
    """Write the evaluation rows (packed like the training rows) to out/eval; returns their number."""
    import datasets

    ds = datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise UserError("no evaluation samples left after tokenization (all too long or without labels)",
                        hint="raise data.max_length or check the data.eval records")
    if data.packing:
        (work / EVAL_DIR).mkdir()
        ds = pack_dataset(ds, data.max_length, work / EVAL_DIR)
    ds.save_to_disk(str(out / EVAL_DIR))
    return len(ds)
