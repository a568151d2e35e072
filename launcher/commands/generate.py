"""`sharpen generate SOURCE --prompts FILE.jsonl`: completions of a trained model, one JSON line each.

Decoded by GRPO's rollout code (training/rollout/generate.py: a KV cache, each row seeded by its own key,
so a completion depends on its prompt, --seed and the model, not on its batch); prompts are sorted by
length into batches, and formatted with the source's chat template (launcher/source.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.source import (
    Source,
    add_source_arguments,
    check_source,
    end_of_turn,
    format_prompt,
    source_from_args,
)

ROLES = ("system", "user", "assistant", "tool")


def register(sub) -> None:
    """The `generate` subcommand's arguments."""
    p = sub.add_parser("generate", help="completions of a run's model (or any model) for a JSONL file of prompts")
    add_source_arguments(p)
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help='one prompt a line: {"prompt": "text"}, {"messages": [{"role", "content"}...]} or "text"')
    p.add_argument("--out", metavar="FILE.jsonl", help="where the completions go (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens per completion at most (128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (the default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling's mass (1: off)")
    p.add_argument("--n", type=int, default=1, metavar="K", help="completions per prompt (1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed gives the same completions")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="rows decoded together (16)")
    p.add_argument("--raw", action="store_true",
                   help="use text prompts as they are, without the chat template (a model trained on plain text)")


@dataclass(frozen=True)
class Prompt:
    """One prompts line: the text, or the message list, as given."""

    value: str | list[dict]
    where: str  # FILE:LINE


def read_prompts(path: Path) -> list[Prompt]:
    """Every non-blank line of a prompts file; a UserError naming FILE:LINE for the first that is not a prompt."""
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not JSON ({error.msg}, column {error.colno})") from None
        prompts.append(Prompt(_prompt_value(record, where), where))
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it", 'one a line: {"prompt": "text"}')
    return prompts


def _prompt_value(record: Any, where: str) -> str | list[dict]:
    if isinstance(record, str):
        value = record
    elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
        value = record["prompt"]
    elif isinstance(record, dict) and "messages" in record:
        value = record["messages"]
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
                raise UserError(
                    f"{where}: messages[{i}] is not {{\"role\": {'|'.join(ROLES)}, \"content\": text}}: {json.dumps(message)[:80]}"
                )
    else:
        raise UserError(f'{where}: expected {{"prompt": "text"}}, {{"messages": [...]}} or a JSON string, got {json.dumps(record)[:80]}')
    if not value:
        raise UserError(f"{where}: an empty prompt")
    return value


def run(args: argparse.Namespace) -> int:
    for name, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--n", args.n, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature must be >= 0 (0: greedy) and --top-p in (0, 1]; got {args.temperature}, {args.top_p}")
    check_source(args.source, args.checkpoint, args.adapter)
    prompts = read_prompts(Path(args.prompts))
    source = source_from_args(args)
    print(f"sharpen: generating with {source.describe}", file=sys.stderr)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 (stdout stays open)
    started = time.perf_counter()
    count = tokens = 0
    try:
        for row in generate_rows(source, prompts, args):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            count += 1
            tokens += row["completion_tokens"]
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - started
    where = f" to {args.out}" if args.out else ""
    print(f"sharpen: {count} completions of {len(prompts)} prompts, {tokens} tokens in {seconds:.1f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s){where}", file=sys.stderr)
    return 0


def encode_prompts(source: Source, prompts: list[Prompt], raw: bool = False) -> list[list[int]]:
    """Token ids of each prompt as training encodes a prompt (training/data/formats.py: BOS first, no EOS),
    after the chat template; a text is used as it is with `raw`."""
    from training.data.formats import Encoder, encode_prompt

    texts = [p.value if raw and isinstance(p.value, str) else format_prompt(source, p.value) for p in prompts]
    return [ids for ids, _, _ in encode_prompt({"prompt": texts}, Encoder(source.tokenizer))]


def generate_rows(source: Source, prompts: list[Prompt], args: argparse.Namespace):
    """Yield one output row per completion, batch by batch, prompts in order of length (shortest first)."""
    from training.rollout.generate import SamplingSettings, generate

    settings = SamplingSettings(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    ids = encode_prompts(source, prompts, getattr(args, "raw", False))
    tokenizer = source.tokenizer
    eos, _ = end_of_turn(tokenizer, source.chat_template, source.model)  # EOS, and the template's turn end
    order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
    rows = [(i, k) for i in order for k in range(args.n)]
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        done = generate(
            source.model, [ids[i] for i, _ in batch], [(args.seed, 0, i, k) for i, k in batch], settings,
            tokenizer.pad_token_id, eos, inference=True,
        )
        for (i, k), tokens, ended in zip(batch, done.token_ids, done.ended_by_eos, strict=True):
            text_tokens = tokens[:-1] if ended else tokens  # the EOS is how it ended, not what it said
            yield {
                "prompt": prompts[i].value,
                "completion": tokenizer.decode(text_tokens, skip_special_tokens=True),
                "index": i,
                "sample": k,
                "prompt_tokens": len(ids[i]),
                "completion_tokens": len(tokens),
                "finish_reason": "stop" if ended else "length",
            }


COMMANDS = {"generate": run}
