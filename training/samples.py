"""A few eval prompts completed before and after training (greedy, short): RUN/samples.json, and its section
of report.md, the first thing a person looks at after a fine-tune.

The prompts are the first distinct ones among the eval rows as the cache holds them: the tokens of a
sequence before its first label token (SFT: the turns before the first answer; a preference pair: its
chosen sequence's prompt; a feedback record: its prompt), with the answer that follows as the reference.
They are completed by GRPO's decode loop (training/rollout/generate.py) with top_k 1, the argmax, under
the strategy: where a forward is a collective (fsdp, zero3) every rank decodes them in lockstep, elsewhere
rank 0 alone. The decode draws no random number that training draws (its generators are its own, and in
eval mode dropout is off), so the losses are those of the same run without it. A fresh run completes them
before its first step and keeps them in RUN/samples.json; a resumed run reads them back from there, and
every run adds the completions after its last step.
"""

from __future__ import annotations

import json
import logging
import os
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sharpen")

SAMPLES_FILE = "samples.json"
MAX_NEW_TOKENS = 48
ROWS_SCANNED = 256  # eval rows looked at for prompts: rows with none (text, train_on: all) are not read to the end
IGNORE_INDEX = -100  # training/data/packing.py's: a position without a label
# What a row's reference answer is, by method kind; the kinds not named here get no samples, and why.
REFERENCES = {"sft": "reference answer", "dpo": "chosen", "orpo": "chosen", "simpo": "chosen", "kto": "completion"}
NOT_SAMPLED = {
    "pretrain": "its text has no prompt to complete",
    "reward": "a reward model does not generate",
    "grpo": "its completions during training are in RUN/completions.jsonl",
}


@dataclass(frozen=True)
class SamplePrompt:
    """One eval prompt to complete: its token ids, the answer the data gives it, and what that answer is."""

    prompt_ids: list[int]
    reference_ids: list[int]
    reference: str  # "reference answer", "chosen", "completion (desirable)", ...


def split_at_first_answer(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, answer) of one sequence with shifted labels (labels[i] is the target of position i): the
    tokens up to the one that predicts the first label token, and the run of label tokens after it."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        return [], []
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(ids[: first + 1]), list(ids[first + 1 : end + 1])


def eval_prompts(dataset, kind: str, count: int, bos_token_id: int | None = None) -> list[SamplePrompt]:
    """The first `count` distinct prompts of the eval rows, in row order, each with its reference answer.
    SFT takes every sample of a packed row; the preference methods a pair's chosen sequence (its first);
    a sequence whose prompt is no more than BOS (text, train_on: all) has none."""
    names = ["input_ids", "labels", "segment_lengths"] + (["desirable"] if "desirable" in dataset.column_names else [])
    rows = dataset.select_columns(names)
    found: list[SamplePrompt] = []
    seen: set[tuple[int, ...]] = set()
    for index in range(min(len(rows), ROWS_SCANNED)):
        row = rows[index]
        ids, labels, start = row["input_ids"], row["labels"], 0
        lengths = row["segment_lengths"] if kind == "sft" else row["segment_lengths"][:1]
        for length in lengths:
            prompt, answer = split_at_first_answer(ids[start : start + length], labels[start : start + length])
            start += length
            if not [t for t in prompt if t != bos_token_id] or tuple(prompt) in seen:
                continue
            reference = REFERENCES[kind]
            if "desirable" in row:
                reference += " (desirable)" if row["desirable"] else " (undesirable)"
            found.append(SamplePrompt(prompt, answer, reference))
            seen.add(tuple(prompt))
            if len(found) == count:
                return found
    return found


def greedy_completions(strategy, prompts: list[list[int]], pad_token_id: int, eos_token_id: int,
                       max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]] | None:
    """Each prompt's greedy completion (its EOS kept) by the model as `strategy` holds it. Every rank calls
    it: where a forward is a collective all ranks decode, in lockstep; elsewhere rank 0 alone and the
    others get None. Compiled layers run eagerly here: a decode's shapes would only add graphs."""
    import torch

    from training.rollout.generate import SamplingSettings, all_ranks_done, generate

    env, collective = strategy.env, strategy.collective_forward
    if not collective and not env.is_main:
        return None

    settings = SamplingSettings(max_completion_length=max_new_tokens, top_k=1)
    keys = [(row,) for row in range(len(prompts))]  # unused by argmax, but one per row
    with torch.compiler.set_stance("force_eager"), strategy.forward_context():
        out = generate(strategy.unwrap(), prompts, keys, settings, pad_token_id, eos_token_id,
                       all_done=all_ranks_done(strategy) if collective else None, inference=not collective)
    return out.token_ids


class EvalSamples:
    """The run's samples: `before_training` on every rank before the first step, `after_training` after the
    last; rank 0 keeps them in RUN/samples.json (the report reads them there)."""

    def __init__(self, strategy, tokenizer, prompts: list[SamplePrompt], run_dir: Path,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.strategy, self.tokenizer, self.prompts = strategy, tokenizer, prompts
        self.path, self.max_new_tokens = Path(run_dir) / SAMPLES_FILE, max_new_tokens
        self.before: list[str] | None = None

    @classmethod
    def for_run(cls, kind: str, count: int, strategy, eval_dataset, tokenizer, run_dir: Path) -> EvalSamples | None:
        """The samples of a run of method `kind` with logging.samples `count`, or None, with a line in the
        rank log saying why, where it has none."""
        why = None
        if count == 0:
            why = "logging.samples is 0"
        elif kind in NOT_SAMPLED:
            why = f"method {kind}: {NOT_SAMPLED[kind]}"
        elif eval_dataset is None:
            why = "the job has no eval data (data.eval or data.eval_split)"
        prompts = [] if why else eval_prompts(eval_dataset, kind, count, tokenizer.bos_token_id)
        if not why and not prompts:
            why = "no eval sequence has a prompt before its first label token"
        if why:
            log.info("samples: none in report.md (%s)", why)
            return None
        return cls(strategy, tokenizer, prompts, run_dir)

    def before_training(self, fresh: bool) -> None:
        """A fresh run's completions of the initial model, written to RUN/samples.json; a resumed run's,
        read back from there (None where it has none: a run started before they were kept)."""
        if not fresh:
            if self.strategy.env.is_main:
                self.before = self._recorded_before()
                log.info("samples: completions before training %s", "read from " + str(self.path)
                         if self.before is not None else f"not found in {self.path}")
            return
        self.before = self._complete("before training")
        if self.before is not None:
            self._write({"before": self.before})

    def after_training(self, step: int) -> None:
        """The trained model's completions of the same prompts, added to RUN/samples.json."""
        after = self._complete(f"after step {step}")
        if after is not None:
            self._write({"before": self.before, "after": after, "after_step": step})

    def _complete(self, when: str) -> list[str] | None:
        started = time.perf_counter()
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = greedy_completions(self.strategy, [p.prompt_ids for p in self.prompts], pad, tok.eos_token_id,
                                 self.max_new_tokens)
        if ids is None or not self.strategy.env.is_main:
            return None  # rank 0 writes them
        log.info("samples: %d eval prompts completed %s (greedy, at most %d new tokens) in %.1f s",
                 len(ids), when, self.max_new_tokens, time.perf_counter() - started)
        return tok.batch_decode(ids, skip_special_tokens=True)

    def _recorded_before(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        recorded = json.loads(self.path.read_text())
        samples = recorded.get("samples", [])
        if [s.get("prompt_ids") for s in samples] != [p.prompt_ids for p in self.prompts]:
            return None  # other prompts: not this run's
        before = [s.get("before") for s in samples]
        return None if None in before else before

    def _write(self, texts: dict[str, Any]) -> None:
        decode = self.tokenizer.decode
        samples = []
        for i, p in enumerate(self.prompts):
            sample = {**asdict(p), "prompt": decode(p.prompt_ids, skip_special_tokens=True),
                      "reference_text": decode(p.reference_ids, skip_special_tokens=True)}
            for key in ("before", "after"):
                if texts.get(key) is not None:
                    sample[key] = texts[key][i]
            samples.append(sample)
        record = {"max_new_tokens": self.max_new_tokens, "samples": samples}
        if "after_step" in texts:
            record["after_step"] = texts["after_step"]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- report.md


def report_section(run_dir: Path) -> list[str]:
    """report.md's "Samples from the eval data" lines from RUN/samples.json ([] where the run has none)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    samples = record.get("samples", [])
    if not samples:
        return []
    after = f"after step {record['after_step']}" if "after_step" in record else "after training"
    lines = [
        "## Samples from the eval data",
        "",
        f"The first {len(samples)} eval prompts, completed greedily (at most {record.get('max_new_tokens')} new "
        f"tokens) before training and {after}.",
        "",
    ]
    for number, sample in enumerate(samples, start=1):
        lines += [f"### Sample {number}", ""]
        lines += _block("Prompt", sample.get("prompt"))
        lines += _block("Before training", sample.get("before"))
        lines += _block(after[0].upper() + after[1:], sample.get("after"))
        lines += _block(sample.get("reference", "reference").capitalize() + " in the data", sample.get("reference_text"))
    return lines


def shown(text: str) -> str:
    """`text` as report.md shows it: control characters (an untrained model's bytes) escaped, as \\x10."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


def _block(title: str, text: str | None) -> list[str]:
    """A titled fenced block; the fence is longer than any run of backticks in the text."""
    if text is None:
        return [f"{title}: (not recorded)", ""]
    if not text.strip():
        return [f"{title}: (nothing: the end of the sequence came first)", ""]
    text = shown(text)
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [f"{title}:", "", f"{fence}text", text, fence, ""]
