"""Job file + `--set` overrides → a validated JobSpec, or one UserError that lists every problem at once.

Messages leave out the leading "error: ": the CLI prints every UserError as `error: {exc}`.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from launcher.errors import UserError
from launcher.job_messages import count, dotted, got, problem_lines, report, show
from launcher.method_spec import REWARD_FUNCTION
from launcher.spec import CHAT_TEMPLATES, RULES_CONTEXT, JobSpec, resolve_path
from strategies.job_rules import job_problems
from training.data.prompts import data_columns
from training.rollout.rewards import check_reward_function, resolve_reference

Loc = tuple[Any, ...]
HINT = "`sharpen schema` lists every key with its type, default and meaning (also docs/job-reference.md)"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")

# fmt: off
YAML_HINTS = {"\t": "indent with spaces, not tabs", "expected <block end>": "this line's indentation does not match the lines above",
              "mapping values are not allowed": "quote a value that contains ': ', or fix the indentation",
              "could not find expected ':'": "a key lacks its ':', or a quote or bracket is not closed",
              "end of stream": "a quote or bracket opened here is never closed"}
# fmt: on


def load_job(path: str | Path, overrides: Sequence[str] = (), *, check_inputs: bool = True) -> JobSpec:
    """Read, override, validate and resolve a job file; raise one UserError listing every problem."""
    path = Path(path).expanduser()
    raw, lines, problems = _read(path)
    raw, bad_overrides, parsed = _apply(raw, overrides)
    problems += bad_overrides
    spec, base = None, path.parent.resolve()
    try:
        spec = validate(raw)
        _resolve_paths(spec, base)
    except pydantic.ValidationError as exc:
        problems += [text for text, _ in problem_lines(exc, parsed, lines)]
    if check_inputs:  # also for an invalid file: every problem at once
        problems += _check_inputs(spec.model_dump() if spec else raw, base if spec is None else None, base)
    if problems or spec is None:
        where = " and its --set overrides" if any(p.startswith("--set ") for p in problems) else ""
        raise UserError(report(f"{path}: {count(problems)} in the job file{where}", problems), hint=HINT)
    return spec


def validate(raw: dict) -> JobSpec:
    """`raw` as a JobSpec with every rule checked, the strategies' capability rules among them (which
    JobSpec alone cannot check); pydantic.ValidationError otherwise."""
    return JobSpec.model_validate(raw, context={RULES_CONTEXT: (job_problems,)})


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of `raw` with each `key.path=value` set (value parsed as YAML); bad or unknown keys raise UserError."""
    out, problems, parsed = _apply(raw, overrides)
    try:
        JobSpec.model_validate(out)
    except pydantic.ValidationError as exc:
        lines = problem_lines(exc, parsed)
        problems += [text for text, kind in lines if kind == "extra_forbidden" and text.startswith("--set ")]
    if problems:
        raise UserError(report(f"{count(problems)} in --set overrides", problems), hint=HINT)
    return out


def format_errors(exc: pydantic.ValidationError, source: str) -> str:
    """The user's message for a JobSpec ValidationError: a header, then one `field.path: problem` line each."""
    problems = [text for text, _ in problem_lines(exc)]
    return report(f"{source}: {count(problems)} in the job file", problems)


def check_inputs(spec: JobSpec, *, base: Path | None = None) -> list[str]:
    """Problems with local inputs: missing data files, model or tokenizer directories without their files,
    reward functions that do not import or cannot take TRL's arguments."""
    return _check_inputs(spec.model_dump(), None, base)


# ---- reading and overriding ----------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict, dict[Loc, int], list[str]]:
    """The YAML mapping, the line of every key, and duplicate-key problems."""
    if not path.is_file():
        what = "is a directory, not a job file" if path.is_dir() else "no such job file"
        raise UserError(f"{path}: {what}" + ("" if path.is_absolute() else f" (in {Path.cwd()})"))
    try:
        text = path.read_text(encoding="utf-8")
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the job file ({exc})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        context = f" ({exc.context} on line {exc.context_mark.line + 1})" if exc.context_mark else ""
        rows = text.splitlines() or [""]
        shown = line if line <= len(rows) else (exc.context_mark.line + 1 if exc.context_mark else len(rows))
        source = rows[shown - 1]
        tip = next((f"   <- {t}" for k, t in YAML_HINTS.items() if k in f"{exc.problem}{source}"), "")
        excerpt = f"\n  {shown} | {source}{tip}"
        raise UserError(f"{path}:{line}:{col}: invalid YAML: {exc.problem}{context}{excerpt}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        raise UserError(f"{path}: the job file is empty; it needs at least model.path and data.train", HINT)
    if not isinstance(data, dict):
        sections = "model:, data:, train:, ..."
        raise UserError(
            f"{path}: the top level must be a mapping of sections ({sections}), got {got(data)}", HINT
        )
    lines: dict[Loc, int] = {}
    duplicates: list[str] = []
    _index(node, (), lines, duplicates)
    return data, lines, duplicates


def _index(node: yaml.Node, path: Loc, lines: dict[Loc, int], duplicates: list[str]) -> None:
    """Record the line of every key and list item; a key given twice is a problem (YAML keeps only the last)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index(item, (*path, i), lines, duplicates)
    elif isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first:
                duplicates.append(
                    f"{dotted((*path, key))}: given twice, on lines {first[key]} and {line}; keep one"
                )
            first[key] = lines[(*path, key)] = line
            _index(value, (*path, key), lines, duplicates)


def _apply(raw: dict, overrides: Sequence[str]) -> tuple[dict, list[str], list[tuple[str, Loc]]]:
    """Set each override into a copy of raw; malformed ones are returned as problems, not raised."""
    out, problems, parsed = copy.deepcopy(raw), [], []
    for text in overrides:
        key, eq, value_text = text.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            problems.append(f"--set {text}: not key.path=value (e.g. --set train.lr=1e-4)")
            continue
        loc = tuple(int(p) if p.isdigit() else p for p in parts)
        try:
            error = _set(out, loc, yaml.safe_load(value_text))
        except yaml.YAMLError as exc:
            error = f"the value is not valid YAML ({getattr(exc, 'problem', exc)})"
        problems += [f"--set {text}: {error}"] if error else []
        parsed += [] if error else [(text, loc)]
    return out, problems, parsed


def _set(node: Any, loc: Loc, value: Any) -> str | None:
    """Set node[loc] = value, making missing sections (or a list item at index len) on the way."""
    for i, part in enumerate(loc):
        where = dotted(loc[:i])
        if isinstance(node, list):
            if not isinstance(part, int) or part > len(node):
                return f"{where} is a list of {len(node)} item(s); index it with 0..{len(node) - 1} (or {len(node)} to add one)"
            node += [None] if part == len(node) else []
        elif isinstance(node, dict):
            part = str(part)
        else:
            return f"{where} is {show(node)}, a value, not a section with keys"
        if i == len(loc) - 1:
            node[part] = value
        else:
            if (node[part] if isinstance(node, list) else node.get(part)) is None:
                node[part] = [] if isinstance(loc[i + 1], int) else {}
            node = node[part]
    return None


def _resolve_paths(spec: JobSpec, base: Path) -> None:
    """Relative local paths are relative to the job file's directory (when they exist there)."""
    spec.model.path = resolve_path(spec.model.path, base)
    for f in [*spec.data.train, *spec.data.eval]:
        f.path = resolve_path(f.path, base)
    for reward in getattr(spec.method, "rewards", ()):  # grpo: every rank finds them wherever it starts
        if reward.function:
            reward.function = resolve_reference(reward.function, base)
        if reward.model:
            reward.model = resolve_path(reward.model, base)
    if spec.model.chat_template and spec.model.chat_template not in CHAT_TEMPLATES:  # a .jinja file's path
        spec.model.chat_template = resolve_path(spec.model.chat_template, base)
    for section, key in ((spec.model, "tokenizer"), (spec.data, "cache_dir"), (spec, "output_dir")):
        if getattr(section, key):
            setattr(section, key, resolve_path(getattr(section, key), base))


# ---- inputs --------------------------------------------------------------------------------------------------


def _input_fields(data: dict, base: Path | None = None) -> list[tuple[str, str]]:
    """(field path, value) of each input, from a dumped spec or a raw dict (then resolved against base)."""
    model, section = (data.get(k) if isinstance(data.get(k), dict) else {} for k in ("model", "data"))
    fields = [("model.path", model.get("path")), ("model.tokenizer", model.get("tokenizer"))]
    for split in ("train", "eval"):
        items = section.get(split) if isinstance(section.get(split), list) else []
        fields += [
            (f"data.{split}.{i}.path", f.get("path")) for i, f in enumerate(items) if isinstance(f, dict)
        ]
    fields += [(f"method.rewards.{i}.model", r.get("model")) for i, r in enumerate(_rewards(data))]
    return [(f, resolve_path(v, base) if base else v) for f, v in fields if isinstance(v, str) and v]


def _check_inputs(data: dict, resolve_base: Path | None, base: Path | None) -> list[str]:
    """Every input's problems: the model's and the data's first, then each reward's (models and functions) in order."""
    problems = _check_fields(_input_fields(data, resolve_base), base) + _check_reward_functions(data, base)
    reward_index = re.compile(r"^method\.rewards\.(\d+)\.")

    def order(problem: str) -> tuple[int, int]:
        found = reward_index.match(problem)
        return (1, int(found[1])) if found else (0, 0)

    return sorted(problems, key=order)


def _rewards(data: dict) -> list[dict]:
    """The reward entries of a dumped spec or a raw dict (grpo), each a mapping."""
    method = data.get("method") if isinstance(data.get("method"), dict) else {}
    rewards = method.get("rewards") if isinstance(method.get("rewards"), list) else []
    return [r for r in rewards if isinstance(r, dict)]


def _check_reward_functions(data: dict, base: Path | None) -> list[str]:
    """Each reward function imported here, before any rank starts, and its signature checked against the
    columns the data gives it (when every training file's columns can be read from its start)."""
    rewards = [(i, r["function"]) for i, r in enumerate(_rewards(data))
               if isinstance(r.get("function"), str) and REWARD_FUNCTION.match(r["function"])]  # else: the schema says
    if not rewards:
        return []
    columns: set[str] | None = set()
    for field, value in _input_fields(data, base):
        if field.startswith("data.train."):
            found = data_columns(Path(value).expanduser()) if Path(value).expanduser().is_file() else None
            columns = None if found is None or columns is None else columns | set(found)
    if columns is not None:
        section = data.get("data") if isinstance(data.get("data"), dict) else {}
        train = section.get("train") if isinstance(section.get("train"), list) else []
        columns -= {f.get("field") or "prompt" for f in train if isinstance(f, dict)}  # it arrives as `prompts`
    problems = []
    for i, text in rewards:
        found = check_reward_function(text, base, columns)
        if found:
            problems.append(f"method.rewards.{i}.function: {text!r}: {found[0]}; {found[1]}")
    return problems


def _check_fields(fields: list[tuple[str, str]], base: Path | None) -> list[str]:
    roots = [*([base] if base else []), Path.cwd()]
    problems, reward_models = [], [f for f, _ in fields if f.startswith("method.rewards.")]
    for field, value in fields:
        path, is_data = Path(value).expanduser(), field.startswith("data.")
        local = value.startswith(("./", "../", "/", "~")) or path.exists()
        local = local or (is_data and path.suffix.lower() in DATA_SUFFIXES)
        if not (local or ("/" in value and any((r / value.split("/")[0]).exists() for r in roots))):
            continue  # a hub id: checked when it is downloaded
        given = f"{field}: {value!r}"
        if not path.exists():
            looked = (
                "" if path.is_absolute() else f" (looked in {' and '.join(map(str, dict.fromkeys(roots)))})"
            )
            problems.append(f"{given} does not exist{looked}{_sibling_hint(path, roots)}")
        elif is_data:
            continue
        elif not path.is_dir():
            problems.append(f"{given} is a file; give the directory save_pretrained wrote, or a hub id")
        elif field in ("model.path", *reward_models) and not (path / "config.json").exists():
            problems.append(f"{given} has no config.json; give the directory save_pretrained wrote")
        elif field in reward_models:
            problems += _reward_model_problems(given, path)
        elif field == "model.tokenizer" and not any((path / n).exists() for n in TOKENIZER_FILES):
            problems.append(f"{given} has no {' or '.join(TOKENIZER_FILES)}")
    return problems


def _reward_model_problems(given: str, path: Path) -> list[str]:
    """A reward model directory is scored with its own tokenizer, through a sequence-classification head."""
    problems = []
    if not any((path / n).exists() for n in TOKENIZER_FILES):
        problems.append(f"{given} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); it scores with its own")
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        problems.append(
            f"{given} is a {architectures[0]}, not a sequence-classification model; give a reward model "
            "(e.g. the final/ of a sharpen run with method.kind reward)"
        )
    return problems


def _sibling_hint(path: Path, roots: list[Path]) -> str:
    """`; did you mean 'data/train.jsonl'?` when a file with a close name sits where the missing one should be."""
    for parent in [path.parent] if path.is_absolute() else [r / path.parent for r in roots]:
        close = difflib.get_close_matches(
            path.name, [p.name for p in parent.iterdir()] if parent.is_dir() else []
        )
        if close:
            return f"; did you mean {str(path.parent / close[0])!r}?"
    return ""
