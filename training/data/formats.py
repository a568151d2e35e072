"""Reading data files, and per-format templating of their records into token ids and a target mask.

Every format reduces to the same thing: a rendered text, the character spans of it that carry loss,
and one tokenization of the whole text (with offsets) that maps spans to tokens. Tokenizing the whole
text once, instead of prompt and completion separately, keeps the tokens exactly those a model sees
when the text is tokenized at inference, and works alike for byte-level and sentencepiece tokenizers.
A new record format is one entry in FORMATS. Preference records encode to a (chosen, rejected) pair
of such sequences, which the pipeline stores as one row of two segments. Feedback records (kto) encode
to one such sequence and its thumbs-up / thumbs-down label, stored as one row with a `desirable` column.
Prompt records (grpo) have no target at all: they encode to the prompt's ids, the prompt, and the
record's other columns.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from launcher.errors import UserError
from launcher.method_spec import TRAIN_ON
from launcher.spec import CHAT_ROLES, CHAT_TEMPLATES, SHAREGPT_ROLES, DataFile

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Alpaca-style, without the original one-sentence preamble: it would be ~30 identical prompt tokens per
# sample that cost compute and teach nothing. Prompt a model tuned on this data with exactly this text.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
CHAT_DEFAULT_ROLES = {role: role for role in CHAT_ROLES}


class RecordError(ValueError):
    """Record `index` (within the batch being encoded) is invalid; index None: the whole file is."""

    def __init__(self, index: int | None, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


@dataclass(frozen=True)
class Format:
    """A data format: which fields a record needs, what a valid record looks like, how to encode a batch."""

    name: str
    required: Callable[[str | None], tuple[str, ...]]  # DataFile.field -> the columns a file must have
    example: dict[str, Any]
    encode: Callable[[dict[str, list], Encoder], list]  # per record: (ids, targets), a pair of them, or a prompt
    paired: bool = False  # each record is a (chosen, rejected) pair of sequences
    prompts_only: bool = False  # each record is a prompt to generate from: (ids, prompt, other columns)
    labelled: bool = False  # each record is ((ids, targets), desirable): unpaired feedback (kto)

    def example_line(self) -> str:
        return json.dumps(self.example)


class Encoder:
    """Tokenizer plus the rules shared by every format: BOS/EOS handling, train_on, spans to targets.

    `roles` maps a conversation file's role names to the template's (None: the format's defaults)."""

    def __init__(
        self, tokenizer, train_on: str = "completion", field: str | None = None, roles: dict[str, str] | None = None
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.field = field
        self.roles = roles
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def for_file(cls, tokenizer, train_on: str, file: DataFile) -> Encoder:
        """The encoder of one data item: its field, and its roles added to the format's defaults."""
        defaults = SHAREGPT_ROLES if file.format == "sharegpt" else CHAT_DEFAULT_ROLES
        roles = {**defaults, **file.roles} if file.roles else None
        return cls(tokenizer, train_on, file.field, roles)

    def encode_spans(self, texts: list[str], spans: list[list[tuple[int, int]]]):
        """Tokenize each text once; a token is a target when it overlaps one of its text's loss spans."""
        if self.train_on == "all":
            spans = [[(0, len(text))] for text in texts]
        backend = self._backend()
        if backend is not None:  # the Rust tokenizer itself: the same ids, without a per-token Python dict
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [
                self.finish(e.ids, span_targets(e.token_to_chars, len(e.ids), s))
                for e, s in zip(encodings, spans, strict=True)
            ]
        if self.tokenizer.is_fast:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            all_ids, offsets = enc["input_ids"], enc["offset_mapping"]
        else:  # slow tokenizers have no offsets: locate each span's start by tokenizing the text before it
            all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            offsets = [self._approximate_offsets(text, s) for text, s in zip(texts, spans, strict=True)]
        out = []
        for ids, offs, text_spans in zip(all_ids, offsets, spans, strict=True):
            out.append(self.finish(list(ids), span_targets(offs.__getitem__, len(offs), text_spans)))
        return out

    def _backend(self):
        """The fast tokenizer's Rust tokenizer when calling it directly gives what the wrapper's call would:
        no truncation or padding set on it, special tokens encoded as the wrapper encodes them. Else None."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return backend if bool(getattr(backend, "encode_special_tokens", False)) == split else None

    def _approximate_offsets(self, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        n_total = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bounds = sorted({0, len(text), *(b for span in spans for b in span)})
        counts = [len(self.tokenizer(text[:b], add_special_tokens=False)["input_ids"]) for b in bounds]
        offsets = []
        for (lo, hi), (n_lo, n_hi) in zip(pairwise(bounds), pairwise(counts), strict=True):
            offsets += [(lo, hi)] * (n_hi - n_lo)
        return (offsets + [(len(text), len(text))] * n_total)[:n_total]

    def finish(self, ids: list[int], targets: list[bool]) -> tuple[list[int], list[bool]]:
        """Start with BOS (when the tokenizer has one) and end with EOS, once each.

        EOS carries loss when the token before it does: a completion ends by predicting EOS,
        a conversation that ends on a user turn does not.
        """
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, targets = [self.bos_id, *ids], [self.train_on == "all", *targets]
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids, targets = [*ids, self.eos_id], [*targets, self.train_on == "all" or bool(targets and targets[-1])]
        return ids, targets


def span_targets(chars: Callable[[int], tuple[int, int]], n: int, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token of `n` (its characters `chars(i)`: start, end): whether it overlaps a loss span (end > lo and
    start < hi). A token never starts or ends before the one before it, so each span's tokens are one run,
    found by bisecting: a Rust Encoding's whole offsets list is never built (that cost as much as tokenizing)."""
    mask = np.zeros(n, dtype=bool)
    for lo, hi in spans:
        first = bisect.bisect_right(range(n), lo, key=lambda i: chars(i)[1])  # the first token ending after lo
        stop = bisect.bisect_left(range(n), hi, key=lambda i: chars(i)[0])  # the first starting at or after hi
        mask[first:stop] = True
    return mask.tolist()


def _string(record: dict, name: str, index: int, *, optional: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        raise RecordError(index, f"field '{name}' is missing")
    if not isinstance(value, str):
        raise RecordError(index, f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def encode_alpaca(batch: dict[str, list], enc: Encoder):
    texts, spans = [], []
    for i, record in enumerate(_rows(batch)):
        instruction = _string(record, "instruction", i)
        extra = _string(record, "input", i, optional=True)
        output = _string(record, "output", i)
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(
            instruction=instruction, input=extra
        )
        texts.append(prompt + output)
        spans.append([(len(prompt), len(prompt) + len(output))])
    return enc.encode_spans(texts, spans)


def encode_text(batch: dict[str, list], enc: Encoder):
    name = enc.field or "text"
    texts = [_string(record, name, i) for i, record in enumerate(_rows(batch))]
    return enc.encode_spans(texts, [[(0, len(t))] for t in texts])


def _tools(record: dict, index: int) -> list[dict] | None:
    """A record's tool definitions (JSON schemas) for the template: a list, or a JSON string of one."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise RecordError(index, f"field 'tools' is a string but not JSON: {e.msg}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RecordError(index, "field 'tools' must be a list of tool definitions (JSON schemas)")
    return tools or None


def _messages(
    record: dict, name: str, index: int, roles: dict[str, str] | None = None, system_column: bool = False
) -> list[dict]:
    """A record's conversation as {role, content, ...} messages with the template's role names.

    A message's role may be under `role` or `from`, its text under `content` or `value` (ShareGPT); its
    role is mapped by `roles` (the file's role names to system, user, assistant, tool), and a role the
    mapping does not name is refused: a prompt turn it would silently become could hide a whole dataset's
    answers. With `system_column`, a record's `system` string (sharegpt's) opens a conversation that has none."""
    roles = roles or CHAT_DEFAULT_ROLES
    messages = record.get(name)
    if not isinstance(messages, list) or not messages:
        raise RecordError(index, f"field '{name}' must be a non-empty list of {{role, content}} messages")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(index, f"{name}[{j}] must be a {{role, content}} message")
        # Parquet/JSON loaders give every message the union of all keys; None values are not part of the message.
        message = {k: v for k, v in message.items() if v is not None}
        role = message.pop("role", message.pop("from", None))
        if not isinstance(role, str):
            raise RecordError(index, f"{name}[{j}] needs a string 'role' (or 'from')")
        if role not in roles:
            raise RecordError(
                index,
                f"{name}[{j}] has the role {role!r}, which is not one of the roles this file may use "
                f"({', '.join(roles)}); map it with roles: {{{role}: user}} (or assistant, system, tool) on the data item",
            )
        message = {"role": roles[role], **message}
        if "content" not in message and "value" in message:
            message["content"] = message.pop("value")
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            raise RecordError(index, f"{name}[{j}] needs a string 'content' (or 'value')")
        out.append(message)
    system = record.get("system") if system_column else None
    if isinstance(system, str) and system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


def _template(tokenizer) -> str:
    if not tokenizer.chat_template:
        raise RecordError(
            None,
            "the tokenizer has no chat template (a base model?): set model.chat_template to a built-in "
            f"({', '.join(CHAT_TEMPLATES)}) or the path of a .jinja file, or use format: text",
        )
    return tokenizer.get_chat_template()


def _render(tokenizer, messages: list[dict], tools, index: int, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # the template's raise_exception, or a message it cannot render
        raise RecordError(index, f"the chat template cannot render this conversation: {e}") from None


def _assistant_spans(tokenizer, messages: list[dict], tools, full: str, index: int) -> list[tuple[int, int]]:
    """Character spans of assistant turns, found by rendering growing prefixes of the conversation.

    The text an assistant turn adds is render(messages[:i+1]) minus render(messages[:i]) with the
    generation prompt: the header is prompt, the content and its end-of-turn marker are targets. This
    needs a template whose renderings of prefixes are prefixes of the whole; one that rewrites earlier
    turns (e.g. strips reasoning) is refused rather than trained on misplaced labels.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], tools, index, True)
        except RecordError:  # some templates cannot render an empty prefix (an assistant-first conversation)
            before = ""
        upto = _render(tokenizer, messages[: i + 1], tools, index)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise RecordError(
                index,
                "the tokenizer's chat template does not render this conversation's prefixes as prefixes of the "
                "whole, so its assistant turns cannot be located; use a template with {% generation %} "
                "blocks (model.chat_template), or method.train_on: all",
            )
        spans.append((len(before), len(upto)))
    return spans


def _generation_spans(tokenizer, template: str, messages: list[dict], tools, index: int):
    """(text, the character span of each {% generation %} block): the template marks assistant text itself."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, spans = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template, return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
    except Exception as e:
        raise RecordError(index, f"the chat template cannot render this conversation: {e}") from None
    return texts[0], list(spans[0])


def conversation_spans(enc: Encoder, messages: list[dict], tools, index: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and its loss spans under enc.train_on: every assistant turn (completion),
    the last one (last_turn) or everything (all). Tool results are never assistant text."""
    tokenizer = enc.tokenizer
    template = _template(tokenizer)
    if enc.train_on == "all":
        text = _render(tokenizer, messages, tools, index)
        return text, [(0, len(text))]
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if _GENERATION_BLOCK.search(template):
        text, spans = _generation_spans(tokenizer, template, messages, tools, index)
        if enc.train_on == "completion" or len(spans) == n_assistant:
            return text, spans[-1:] if enc.train_on == "last_turn" else spans
    else:
        text = _render(tokenizer, messages, tools, index)
    # last_turn where blocks and assistant turns do not pair up one to one: locate the turns by prefixes
    spans = _assistant_spans(tokenizer, messages, tools, text, index)
    return text, spans[-1:] if enc.train_on == "last_turn" else spans


def encode_chat(batch: dict[str, list], enc: Encoder, name: str = "messages", sharegpt: bool = False):
    """Each conversation rendered by the chat template; its assistant turns (per train_on) carry loss."""
    name = enc.field or name
    roles = enc.roles or (SHAREGPT_ROLES if sharegpt else CHAT_DEFAULT_ROLES)
    texts, spans = [], []
    for i, record in enumerate(_rows(batch)):
        messages = _messages(record, name, i, roles, system_column=sharegpt)
        text, record_spans = conversation_spans(enc, messages, _tools(record, i), i)
        texts.append(text)
        spans.append(record_spans)
    return enc.encode_spans(texts, spans)


def encode_sharegpt(batch: dict[str, list], enc: Encoder):
    """ShareGPT records: `conversations` of {from, value} turns (human, gpt, ...), encoded as chat."""
    return encode_chat(batch, enc, "conversations", sharegpt=True)


def _turns(value, name: str, index: int, role: str, roles: dict[str, str] | None = None) -> list[dict]:
    """A preference field as chat messages: a message list as is, a string as one `role` message."""
    if isinstance(value, list):
        return _messages({name: value}, name, index, roles)
    return [{"role": role, "content": value}]


def _preference_texts(
    record: dict, index: int, tokenizer, answers: tuple[str, ...] = ("chosen", "rejected"),
    roles: dict[str, str] | None = None,
) -> list[tuple[str, tuple[int, int]]]:
    """(text, loss span) of prompt + answer for each of `answers` (chosen and rejected; feedback's completion).

    Strings are concatenated as they are (the prompt carries its own template, as in TRL); when any of
    the fields is a message list, each answer is rendered with the tokenizer's chat template and its
    span is what it adds after the prompt with the generation prompt."""
    fields = {}
    for name in ("prompt", *answers):
        value = record.get(name)
        if value is None:
            raise RecordError(index, f"field '{name}' is missing")
        if not isinstance(value, (str, list)):
            raise RecordError(index, f"field '{name}' must be a string or a list of messages, got {type(value).__name__}")
        fields[name] = value
    if not any(isinstance(v, list) for v in fields.values()):
        prompt = fields["prompt"]
        return [(prompt + fields[k], (len(prompt), len(prompt) + len(fields[k]))) for k in answers]
    if not tokenizer.chat_template:
        raise RecordError(None, "message lists need a chat template, and the tokenizer has none; set "
                          "model.chat_template or give the fields as strings")
    prompt = _turns(fields["prompt"], "prompt", index, "user", roles)
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    out = []
    for name in answers:
        answer = _turns(fields[name], name, index, "assistant", roles)
        if len(answer) > len(prompt) and answer[: len(prompt)] == prompt:
            answer = answer[len(prompt) :]  # answers that repeat the prompt's turns (UltraFeedback binarized)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        if not full.startswith(before):
            raise RecordError(
                index, f"the chat template does not render the prompt as the start of prompt + {name}, so the "
                "answer cannot be located; give the pair as strings",
            )
        out.append((full, (len(before), len(full))))
    return out


def encode_preference(batch: dict[str, list], enc: Encoder):
    """Each record to ((chosen ids, targets), (rejected ids, targets)); the prompt never carries loss."""
    if enc.train_on != "completion":  # a method setting for SFT; a preference is about the answers only
        enc = Encoder(enc.tokenizer, "completion", enc.field, enc.roles)
    texts, spans = [], []
    for i, record in enumerate(_rows(batch)):
        for text, span in _preference_texts(record, i, enc.tokenizer, roles=enc.roles):
            texts.append(text)
            spans.append([span])
    encoded = enc.encode_spans(texts, spans)
    return [(encoded[k], encoded[k + 1]) for k in range(0, len(encoded), 2)]


def _desirable(record: dict, index: int) -> bool:
    value = record.get("label")
    if value is None:
        raise RecordError(index, "field 'label' is missing: say whether the completion is desirable (true or false)")
    if not isinstance(value, bool):
        got = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
        raise RecordError(index, f"field 'label' must be true or false (a JSON boolean), got {got}")
    return value


def encode_feedback(batch: dict[str, list], enc: Encoder):
    """Each record to ((prompt + completion ids, targets on the completion), desirable): KTO's unpaired data."""
    if enc.train_on != "completion":  # as for preferences: the label is about the completion only
        enc = Encoder(enc.tokenizer, "completion", enc.field, enc.roles)
    texts, spans, labels = [], [], []
    for i, record in enumerate(_rows(batch)):
        labels.append(_desirable(record, i))
        ((text, span),) = _preference_texts(record, i, enc.tokenizer, ("completion",), enc.roles)
        texts.append(text)
        spans.append([span])
    return list(zip(enc.encode_spans(texts, spans), labels, strict=True))


def encode_prompt(batch: dict[str, list], enc: Encoder):
    """Each record to (prompt ids, the prompt as given, its other columns); BOS first, no EOS (it is continued).

    A string prompt is tokenized as it is; messages are rendered with the chat template and its generation
    prompt, so the ids end where the assistant's answer begins."""
    name, tokenizer = enc.field or "prompt", enc.tokenizer
    prompts, texts = [], []
    for i, record in enumerate(_rows(batch)):
        value = record.get(name)
        if value is None:
            raise RecordError(i, f"field '{name}' is missing")
        if isinstance(value, list):
            if not tokenizer.chat_template:
                raise RecordError(None, "message prompts need a chat template, and the tokenizer has none; set "
                                  "model.chat_template or give the prompts as strings")
            value = _messages(record, name, i, enc.roles)
            texts.append(tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True))
        elif isinstance(value, str):
            texts.append(value)
        else:
            raise RecordError(i, f"field '{name}' must be a string or a list of messages, got {type(value).__name__}")
        prompts.append(value)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = [] if enc.bos_id is None else [enc.bos_id]
    others = [{k: v for k, v in record.items() if k != name} for record in _rows(batch)]
    return [
        ((bos if bos and (not row or row[0] != bos[0]) else []) + list(row), prompt, other)
        for row, prompt, other in zip(ids, prompts, others, strict=True)
    ]


FORMATS: dict[str, Format] = {
    "alpaca": Format(
        "alpaca",
        lambda field: ("instruction", "output"),
        {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "7"},
        encode_alpaca,
    ),
    "chat": Format(
        "chat",
        lambda field: (field or "messages",),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        encode_chat,
    ),
    "sharegpt": Format(
        "sharegpt",
        lambda field: (field or "conversations",),
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        encode_sharegpt,
    ),
    "text": Format("text", lambda field: (field or "text",), {"text": "Some document text."}, encode_text),
    "preference": Format(
        "preference",
        lambda field: ("prompt", "chosen", "rejected"),
        {"prompt": "2+2? ", "chosen": "4", "rejected": "5"},
        encode_preference,
        paired=True,
    ),
    "feedback": Format(
        "feedback",
        lambda field: ("prompt", "completion", "label"),
        {"prompt": "2+2? ", "completion": "4", "label": True},
        encode_feedback,
        labelled=True,
    ),
    "prompt": Format(
        "prompt",
        lambda field: (field or "prompt",),
        {"prompt": "Name a colour: ", "answer": "blue"},
        encode_prompt,
        prompts_only=True,
    ),
}


def map_columns(ds, file: DataFile, label: str):
    """`ds` with the file's columns renamed to the format's fields, as data item's `columns:` maps them.

    A column of the file that already has a mapped field's name is dropped first (the mapping says
    which column holds that field). A mapped column the file lacks is a UserError naming both."""
    if not file.columns:
        return ds
    missing = {f: c for f, c in file.columns.items() if c not in ds.column_names}
    if missing:
        named = ", ".join(f"{field}: {column!r}" for field, column in missing.items())
        raise UserError(
            f"{label}: columns maps {named}, but the records have no such column; "
            f"their columns are {', '.join(ds.column_names) or 'none'}",
            hint=f"fix the column names in columns: {{{', '.join(f'{k}: {v}' for k, v in file.columns.items())}}}",
        )
    sources = set(file.columns.values())
    shadowed = [f for f in file.columns if f in ds.column_names and f not in sources]
    if shadowed:
        ds = ds.remove_columns(shadowed)
    renames = {column: field for field, column in file.columns.items() if column != field}
    return ds.rename_columns(renames) if renames else ds


# ---------------------------------------------------------------- reading files


def file_type(path: Path) -> str | None:
    """The datasets builder for a data file ("json", "parquet", "csv"), looking through a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def source_files(i: int, file: DataFile, section: str = "train") -> list[Path] | None:
    """The local data files of data.<section>[i] (None: a hub dataset); UserError when there is nothing to read."""
    label = f"data.{section}[{i}] ({file.path})"
    path = Path(file.path).expanduser()
    if path.is_file():
        if not file_type(path):
            raise UserError(f"{label}: unknown file type", hint=f"use one of {', '.join(BUILDERS)}")
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and file_type(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"{label}: the directory holds no {'/'.join(BUILDERS)} files")
        if len({file_type(p) for p in files}) > 1:
            raise UserError(f"{label}: the directory mixes file types; list each type as its own data.{section} entry")
        return files
    if HUB_ID.match(file.path) and not file_type(path) and not file.path.startswith("."):
        return None
    raise UserError(f"{label}: file not found: {path.absolute()}")


def load_source(i: int, file: DataFile, path: Path | None, work: Path, section: str = "train"):
    """One file (or the hub dataset) of data.<section>[i] as a datasets.Dataset; its Arrow copy goes under `work`."""
    import datasets

    label = f"data.{section}[{i}] ({path or file.path})"
    if path is None:
        try:
            return datasets.load_dataset(file.path, split=file.split)
        except Exception as e:
            raise UserError(
                f"{label}: no such local file or directory, and loading it as a hub dataset failed: {e}"
            ) from e
    bad_text = utf8_error(path)
    if bad_text:
        raise UserError(f"{label}: cannot read it: {bad_text}", hint="re-encode it, e.g. iconv -f latin1 -t utf-8")
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its own log of a bad file: ours says it
    try:
        return datasets.load_dataset(file_type(path), data_files=[str(path)], split="train", cache_dir=str(work))
    except Exception as e:
        cause = e.__cause__ or e
        where = json_error(path) if file_type(path) == "json" else None
        example = FORMATS[file.format].example_line()
        raise UserError(
            f"{label}: cannot read it: {where or cause}",
            hint=f"JSON Lines hold one object per line, e.g. {example}" if where else None,
        ) from e
    finally:
        datasets.utils.logging.set_verbosity(verbosity)


def utf8_error(path: Path, chunk: int = 16 << 20) -> str | None:
    """Where a JSON, JSONL or CSV file stops being UTF-8 text (its line, column and the byte), or None.

    The Arrow readers load such bytes without a word and the records fail later, far from the file; this
    reads the file in chunks (memory stays bounded) before it is loaded."""
    if path.suffix.lower() not in (".json", ".jsonl", ".csv"):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, tail = 1, b""  # tail: the current line's bytes so far (for the column)
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError:
                held = tail + data
                bad = _first_invalid(held)
                line, column = lines + held.count(b"\n", 0, bad), bad - held.rfind(b"\n", 0, bad)
                return f"line {line}: not UTF-8 text (byte 0x{held[bad]:02x} at column {column}); save the file as UTF-8"
            if not data:
                return None
            lines += data.count(b"\n")
            tail = data[data.rfind(b"\n") + 1 :] if b"\n" in data else tail + data


def _first_invalid(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return len(data)


def json_error(path: Path) -> str | None:
    """Where a JSON/JSONL file is malformed (the Arrow reader's own message has no line number)."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return None
    text = path.read_text(errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document (an array of records): well formed
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            return f"line {e.lineno}: {e.msg} (column {e.colno})"
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines, whatever the suffix
        if line.strip():
            try:
                if not isinstance(json.loads(line), dict):
                    return f"line {number}: not a JSON object"
            except json.JSONDecodeError as e:
                return f"line {number}: {e.msg} (column {e.colno})"
    return None


def record_location(path: Path | None, index: int) -> str:
    """Record `index` of a file as a person finds it: its line in a JSONL or CSV file (blank lines skipped)."""
    if path is not None and path.suffix.lower() == ".csv":
        return f"record {index + 1} (line {index + 2})"
    if path is not None and path.suffix.lower() == ".jsonl":
        lines = (n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip())
        for k, number in enumerate(lines):
            if k == index:
                return f"record {index + 1} (line {number})"
    return f"record {index + 1}"
