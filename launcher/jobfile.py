"""Job file + `--set` overrides → a validated JobSpec, or one UserError that lists every problem at once.

Messages leave out the leading "error: ": the CLI prints every UserError as `error: {exc}`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from launcher.errors import UserError
from launcher.job_messages import count, dotted, got, problem_lines, report, show
from launcher.spec import RULES_CONTEXT, JobSpec, resolve_path
from strategies.job_rules import job_problems

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
        problems += _check_fields(
            _input_fields(spec.model_dump()) if spec else _input_fields(raw, base), base
        )
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
    """Problems with local inputs: missing data files, model or tokenizer directories without their files."""
    return _check_fields(_input_fields(spec.model_dump()), base)


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
    return [(f, resolve_path(v, base) if base else v) for f, v in fields if isinstance(v, str) and v]


def _check_fields(fields: list[tuple[str, str]], base: Path | None) -> list[str]:
    roots = [*([base] if base else []), Path.cwd()]
    problems = []
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
        elif field == "model.path" and not (path / "config.json").exists():
            problems.append(f"{given} has no config.json; give the directory save_pretrained wrote")
        elif field == "model.tokenizer" and not any((path / n).exists() for n in TOKENIZER_FILES):
            problems.append(f"{given} has no {' or '.join(TOKENIZER_FILES)}")
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
