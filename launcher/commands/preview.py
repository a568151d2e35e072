"""`sharpen preview`: the first samples as the model will see them, the tokens that carry loss marked, and
the lengths of all of them. The data goes through the training pipeline itself (prepare_dataset, the
tokenize-once cache a run then reuses), so what is shown is what is trained on."""

from __future__ import annotations

import json
from pathlib import Path

EXIT_OK = 0
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"  # around loss-carrying text when stdout is not a terminal
LOSS_STYLE = "bold black on green"
HISTOGRAM_BINS = 8
HISTOGRAM_WIDTH = 40


def register(sub) -> None:
    """Add `sharpen preview` to the subcommand parser."""
    p = sub.add_parser("preview", help="show the first samples as the model sees them, loss tokens marked")
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a job key")
    p.add_argument("--n", type=int, default=3, help="samples to show (default 3)")


def cmd_preview(args) -> int:
    from rich.console import Console

    from launcher.errors import UserError
    from launcher.jobfile import load_job
    from launcher.method_spec import PAIR_METHODS
    from training.data.cache import META_FILE, load_prepared, load_tokenizer
    from training.data.prepare import prepare_dataset

    if args.n < 0:
        raise UserError(f"--n {args.n}: give the number of samples to show, 0 or more")
    spec = load_job(args.job, args.set)
    tokenizer_path = spec.model.tokenizer or spec.model.path
    cache = prepare_dataset(
        spec.data,
        spec.method.kind,
        tokenizer_path,
        trust_remote_code=spec.model.trust_remote_code,
        train_on=getattr(spec.method, "train_on", "all"),
        chat_template=spec.model.chat_template,
    )
    rows = load_prepared(cache)
    pair = spec.method.kind in PAIR_METHODS
    meta = json.loads((Path(cache) / META_FILE).read_text())
    tokenizer = load_tokenizer(tokenizer_path, spec.model.trust_remote_code)
    console = Console(highlight=False, soft_wrap=True)
    plain = not console.is_terminal
    for index in range(min(args.n, len(rows))):
        row = rows[index]
        for title, ids, targets in segments(row, index, pair):
            console.rule(title, style="dim", characters="-" if plain else "─")
            console.print(render(tokenizer, ids, targets, plain))
    console.rule("lengths", style="dim", characters="-" if plain else "─")
    for line in histogram(list(rows["length"]), spec.data.max_length, plain):
        console.print(line)
    console.print(counts_line(meta, spec.data.max_length))
    if not plain:
        console.print("[dim]highlighted: the tokens that carry loss[/dim]")
    else:
        console.print(f"the tokens that carry loss are between {PLAIN_OPEN} and {PLAIN_CLOSE}")
    return EXIT_OK


def segments(row: dict, index: int, pair: bool) -> list[tuple[str, list[int], list[bool]]]:
    """(title, ids, loss per token) of each sample in a stored row: one, a packed row's several, a pair's two.

    labels are shifted (labels[i] is the target of position i, token i+1), so token t carries loss when
    labels[t-1] is not ignored; a segment's first token never does."""
    from training.data.packing import IGNORE_INDEX

    ids = list(row["input_ids"])
    labels = row.get("labels")
    targets = [False] * len(ids)
    if labels is not None:
        targets = [False] + [label != IGNORE_INDEX for label in labels[:-1]]
    lengths = list(row.get("segment_lengths") or [len(ids)])
    out, start = [], 0
    for k, length in enumerate(lengths):
        end = start + length
        seg_targets = [False, *targets[start + 1 : end]]
        what = f"sample {index + 1}"
        if pair:
            what += (", chosen", ", rejected")[k]
        elif len(lengths) > 1:
            what += f", packed segment {k + 1} of {len(lengths)}"
        if "desirable" in row:
            what += ", desirable" if row["desirable"] else ", undesirable"
        if labels is None:
            what += ", a prompt to generate from"
        out.append((f"{what}: {length} tokens, {sum(seg_targets)} with loss", ids[start:end], seg_targets))
        start = end
    return out


def render(tokenizer, ids: list[int], targets: list[bool], plain: bool):
    """The decoded text with the loss-carrying spans styled (rich) or bracketed (plain)."""
    from rich.text import Text

    # Decode growing prefixes at each run boundary, so a character split across tokens stays whole.
    bounds = [0, *(t for t in range(1, len(ids)) if targets[t] != targets[t - 1]), len(ids)]
    decoded = [tokenizer.decode(ids[:b]) for b in bounds]
    text = Text()
    for k in range(len(bounds) - 1):
        piece = decoded[k + 1][len(decoded[k]):]
        if not (bounds[k] < len(targets) and targets[bounds[k]]):
            text.append(piece)
        elif plain:
            text.append(f"{PLAIN_OPEN}{piece}{PLAIN_CLOSE}")
        else:
            text.append(piece, style=LOSS_STYLE)
    return text


def histogram(lengths: list[int], max_length: int, plain: bool) -> list[str]:
    """Rows of `lo-hi | bar count`: the stored rows' lengths in tokens, in up to HISTOGRAM_BINS bins."""
    if not lengths:
        return ["no rows"]
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // HISTOGRAM_BINS))
    counts: dict[int, int] = {}
    for n in lengths:
        counts[(n - lo) // width] = counts.get((n - lo) // width, 0) + 1
    most = max(counts.values())
    digits = len(str(hi))
    bar_char = "#" if plain else "█"
    lines = []
    for b in range((hi - lo) // width + 1):
        start, end = lo + b * width, min(hi, lo + (b + 1) * width - 1)
        count = counts.get(b, 0)
        bar = bar_char * max(1 if count else 0, round(HISTOGRAM_WIDTH * count / most))
        lines.append(f"{start:>{digits}}-{end:<{digits}} tokens | {bar} {count}")
    mean = sum(lengths) / len(lengths)
    lines.append(f"{len(lengths)} rows, {min(lengths)} to {max(lengths)} tokens (mean {mean:.0f}), max_length {max_length}")
    return lines


def counts_line(meta: dict, max_length: int) -> str:
    """What tokenizing did to the records: how many were truncated, and dropped (too long, nothing to learn)."""
    s = meta["stats"]
    return (
        f"{s['records']} records: {s['truncated']} truncated to {max_length} tokens, "
        f"{s['dropped_too_long']} dropped as too long, {s['dropped_no_labels']} dropped with no token to learn from"
    )


COMMANDS = {"preview": cmd_preview}
