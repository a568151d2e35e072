"""How a job file's problems read: field paths, "did you mean", aliases from other tools, value descriptions."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

import pydantic
import yaml

from launcher.spec import JobSpec

Loc = tuple[Any, ...]

# fmt: off
# Keys people bring from other tools (HF Trainer, axolotl, torchrun, DeepSpeed): a key path, or advice (has spaces).
EPOCHS = "sharpen counts optimizer steps: set train.max_steps"
ACCUMULATION = "set train.global_batch_size instead; accumulation is derived"
ZERO = "set strategy.name: zero1, zero2 or zero3 (sharpen writes the DeepSpeed config)"
REWARD_MODEL = "add {model: DIR_OR_HUB_ID} to method.rewards"
ALIASES = {
    "learning_rate": "train.lr", "lr_scheduler_type": "train.lr_scheduler", "scheduler": "train.lr_scheduler",
    "per_device_train_batch_size": "train.micro_batch_size", "micro_batch": "train.micro_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size", "train_batch_size": "train.global_batch_size",
    "batch_size": "set train.micro_batch_size (per rank) or train.global_batch_size (per optimizer step)",
    "gradient_accumulation_steps": ACCUMULATION, "gradient_accumulation": ACCUMULATION,
    "num_train_epochs": EPOCHS, "epochs": EPOCHS, "num_epochs": EPOCHS, "sample_packing": "data.packing",
    "max_seq_length": "data.max_length", "max_seq_len": "data.max_length", "sequence_len": "data.max_length",
    "seq_len": "data.max_length", "cutoff_len": "data.max_length", "lora_r": "finetune.r", "lora_rank": "finetune.r",
    "lora_alpha": "finetune.alpha", "lora_dropout": "finetune.dropout", "lora_target_modules": "finetune.target_modules",
    "load_in_4bit": "set finetune.type: qlora", "bnb_4bit_quant_type": "finetune.quant_type",
    "bf16": "set model.dtype: bf16", "fp16": "set model.dtype: fp16", "torch_dtype": "model.dtype",
    "precision": "model.dtype", "mixed_precision": "model.dtype", "zero_stage": ZERO, "deepspeed": ZERO,
    "fsdp": "set strategy.name: fsdp", "num_gpus": "resources.gpus_per_node", "gpus": "resources.gpus_per_node",
    "nproc_per_node": "resources.gpus_per_node", "num_nodes": "resources.nodes", "nnodes": "resources.nodes",
    "model_name_or_path": "model.path", "base_model": "model.path", "model_name": "model.path",
    "tokenizer_name": "model.tokenizer", "attn_implementation": "model.attention", "flash_attention": "model.attention",
    "warmup_ratio": "set train.warmup_steps (a number of steps)", "save_steps": "train.save_every",
    "eval_steps": "train.eval_every", "logging_steps": "logging.every", "save_total_limit": "train.keep_last",
    "adam_epsilon": "train.eps", "adam_beta1": "train.betas", "adam_beta2": "train.betas",
    "optimizer": "sharpen uses AdamW: set train.lr, train.betas, train.eps, train.weight_decay",
    "dataset": "data.train", "datasets": "data.train", "training": "train", "trainer": "train", "lora": "finetune",
    "peft": "finetune", "output": "output_dir", "out_dir": "output_dir", "wandb": "logging.wandb",
    "wandb_project": "logging.wandb.project", "report_to": "logging.wandb", "slurm": "cluster.slurm",
    "mlflow": "logging.mlflow", "tensorboard": "logging.tensorboard", "logging_dir": "logging.tensorboard.dir",
    # online RL (TRL's GRPOConfig, OpenRLHF, verl)
    "reward_funcs": "method.rewards", "reward_functions": "method.rewards", "loss_type": "method.loss",
    "reward_weights": "give each method.rewards entry its own weight", "reward_model": REWARD_MODEL,
    "reward_model_path": REWARD_MODEL, "reward_pretrain": REWARD_MODEL, "max_new_tokens": "method.max_completion_length",
    "max_prompt_length": "data.max_length", "generate_max_len": "method.max_completion_length",
    "response_length": "method.max_completion_length", "n_samples_per_prompt": "method.num_generations",
    "group_size": "method.num_generations", "kl_coef": "method.beta", "init_kl_coef": "method.beta",
    "kl_loss_coef": "method.beta", "cliprange": "method.epsilon", "clip_range": "method.epsilon",
    "clip_ratio": "method.epsilon", "epsilon_low": "method.epsilon", "clip_ratio_high": "method.epsilon_high",
    "num_ppo_epochs": "method.num_iterations", "ppo_epochs": "method.num_iterations",
    # preference tuning (TRL's DPOConfig, CPOConfig)
    "rpo_alpha": "method.sft_weight", "simpo_gamma": "method.gamma", "orpo_alpha": "method.beta",
}
VALUE_ALIASES = {  # normalised (lower case, no - _ space) → choice
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32", "fa2": "flash_attention_2",
    "flashattention": "flash_attention_2", "flashattn": "flash_attention_2", "messages": "chat",
    "conversation": "chat", "conversations": "chat", "raw": "text", "pairwise": "preference", "pairs": "preference",
    "dpo": "preference", "fsdp2": "fsdp", "gpu": "cuda", "prompts": "prompt", "promptonly": "prompt",
    "rl": "prompt", "drgrpo": "dr_grpo", "kto": "feedback", "unpaired": "feedback",
}
SHORTHAND = {"model": "path", "method": "kind", "finetune": "type", "strategy": "name", "cluster": "kind",
             "data.train": "path", "data.eval": "path", "logging.wandb": "project"}
TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a string",
              "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping"}
GOT = {int: "the number ", float: "the number ", str: "the string ", list: "a list ", dict: "a mapping "}
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
# fmt: on



def count(problems: list[str]) -> str:
    return f"{len(problems)} problem{'' if len(problems) == 1 else 's'}"


def report(header: str, problems: list[str]) -> str:
    return "\n".join([header, *(f"  {p}" for p in problems)])


def problem_lines(
    exc: pydantic.ValidationError,
    overrides: Sequence[tuple[str, Loc]] = (),
    lines: dict[Loc, int] | None = None,
) -> list[tuple[str, str]]:
    """(text, error type) per problem: `field.path: message (line N)`, or `--set k=v: message`."""
    errors = [(err, *_clean_loc(err["loc"])) for err in exc.errors(include_url=False)]
    entries, unions_done = [], set()
    for err, path, tail, owner in errors:
        if err["type"] == "cross_field":  # our model validator: (primary field, message) pairs
            entries += [(tuple(int(p) if p.isdigit() else p for p in f.split(".")), m, "cross_field")
                        for f, m in err["ctx"]["problems"]]  # fmt: skip
        elif tail and path not in unions_done:
            unions_done.add(path)
            entries += _describe_union(path, [(t, e) for e, p, t, _ in errors if t and p == path])
        elif not tail:
            entries.append((*_describe(err, path, owner), err["type"]))
    out, lines = [], lines or {}
    line_of = {
        path: next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), 0)
        for path, *_ in entries
    }
    for path, message, kind in sorted(entries, key=lambda e: line_of[e[0]] or 10**9):
        # the override that set this key, or made its section (`--set foo.bar=1` makes the unknown section foo)
        made = [
            (t, loc)
            for t, loc in overrides
            if path[: len(loc)] == loc or (loc[: len(path)] == path and path not in lines)
        ]
        if made:
            deeper = f"{dotted(path)}: " if len(path) > len(made[-1][1]) else ""
            out.append((f"--set {made[-1][0]}: {deeper}{message}", kind))
        else:
            line = f" (line {line_of[path]})" if line_of[path] else ""
            out.append((f"{dotted(path) or '(top level)'}: {message}{line}", kind))
    return out


def _clean_loc(loc: Loc) -> tuple[Loc, Loc, Any]:
    """pydantic's loc → (the user's key path, the tail naming a plain-union member, the model owning the last key).

    Discriminated-union tags (`method.dpo.beta`) are dropped: the user wrote `method.beta`.
    """
    path: list[Any] = []
    ann, owner = JobSpec, None
    for i, part in enumerate(loc):
        ann = _unwrap(ann)
        members = [m for m in get_args(ann) if m is not type(None)] if _is_union(ann) else []
        if _is_model(ann):
            owner, field = ann, ann.model_fields.get(part) if isinstance(part, str) else None
            ann = field.annotation if field else None
        elif get_origin(ann) in (list, tuple) and isinstance(part, int):
            ann = (get_args(ann) or (None,))[0]
        elif members and all(_is_model(m) for m in members):
            ann = next((m for m in members if _tag(m) == part), None)
            continue
        elif members:
            return tuple(path), tuple(loc[i:]), owner
        path.append(part)
    return tuple(path), (), owner


def _describe(err: dict, path: Loc, owner: Any) -> tuple[Loc, str]:
    """(path, message) for one pydantic error: the value given and what would be valid."""
    kind, value, ctx = err["type"], err["input"], err.get("ctx") or {}
    field = owner.model_fields.get(path[-1]) if owner and path else None
    if kind == "extra_forbidden":
        return path, _unknown_key(path, owner, value)
    if kind == "missing":
        sub = _unwrap(field.annotation) if field else None
        if _is_model(sub):
            needs = ", ".join(f"{dotted(path)}.{n}" for n, f in sub.model_fields.items() if f.is_required())
            return path, f"missing required section; it needs {needs}"
        return path, "missing (required)" + (f": {field.description}" if field and field.description else "")
    if kind == "union_tag_invalid":
        return (*path, "kind"), _not_one_of(ctx["tag"], re.findall(r"'([^']*)'", ctx["expected_tags"]))
    if kind == "union_tag_not_found":
        kinds = ", ".join(_tag(m) for m in _method_kinds())
        return (*path, "kind"), f"missing; say which method it is: one of {kinds}"
    if kind == "literal_error":
        return path, _not_one_of(value, re.findall(r"'([^']*)'", ctx["expected"]))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        short = SHORTHAND.get(dotted(tuple(p for p in path if not isinstance(p, int))))
        tip = ""
        if short and isinstance(value, (str, int, float)):
            tip = f"; did you mean {{{short}: {show(value)}}}?"
        elif value is None and field and not field.is_required():
            tip = "; for the defaults, remove it or write {}"
        return path, f"expected a mapping (key: value lines), got {got(value)}{tip}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        found = [(a, getattr(m, a, None)) for m in (field.metadata if field else []) for a in BOUNDS]
        found = [(a, b) for a, b in found if b is not None] or [(a, b) for a, b in ctx.items() if a in BOUNDS]
        bounds = " and ".join(f"{BOUNDS[a]} {b:g}" for a, b in found)
        return path, f"{show(value)} is out of range; must be {bounds}"
    if kind in ("too_short", "too_long"):
        most = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
        return path, f"needs {most} item(s), got {ctx['actual_length']}: {show(value)}"
    if kind == "string_pattern_mismatch" and path == ("name",):
        rule = "use letters, digits, '.', '_', '-', starting with a letter or digit"
        return path, f"{show(value)} is not a valid name: {rule}"
    if kind == "value_error":
        return path, f"{show(value)} is not valid: {ctx['error']}"
    if kind == "list_type" and isinstance(value, (str, dict)):
        short = SHORTHAND.get(dotted(tuple(p for p in path if not isinstance(p, int))))
        item = f"{{{short}: {show(value)}}}" if short and isinstance(value, str) else show(value)
        return path, f"expected a list, got {got(value)}; for one item write [{item}]"
    if kind == "string_type" and isinstance(value, (int, float, bool)):
        return path, f'expected a string, got {got(value)}; quote it: "{show(value)}"'
    word = next((w for t, w in TYPE_WORDS.items() if kind.startswith(t)), None)
    if word:
        return path, f"expected {word}, got {got(value)}"
    return path, f"{err['msg'][:1].lower()}{err['msg'][1:]} (got {show(value)})"


def _describe_union(path: Loc, members: list[tuple[Loc, dict]]) -> list[tuple[Loc, str, str]]:
    """One line for a value no member of a plain union (`int | 'auto'`) accepts; or errors inside the member it fits."""
    deeper = [(path + tail[1:], err) for tail, err in members if len(tail) > 1]
    if deeper:  # e.g. target_modules: [1, q_proj] fits list[str] but its item 0 is not a string
        return [(*_describe(err, p, None), err["type"]) for p, err in deeper]
    value, expected = members[0][1]["input"], []
    for _, err in members:
        if err["type"] == "literal_error":
            expected += [repr(c) for c in re.findall(r"'([^']*)'", err["ctx"]["expected"])]
        else:
            expected.append(next((w for t, w in TYPE_WORDS.items() if err["type"].startswith(t)), err["msg"]))
    tip = f"; for one item write [{value}]" if isinstance(value, str) and "a list" in expected else ""
    return [(path, f"{show(value)} is not valid; expected {' or '.join(expected)}{tip}", "union")]


def _unknown_key(path: Loc, owner: Any, value: Any) -> str:
    """`unknown key; did you mean 'lr'?`: an alias from other tools, a close name here, or the same name elsewhere."""
    key, section = str(path[-1]), dotted(tuple(p for p in path[:-1] if not isinstance(p, int)))
    what = "unknown key" if section or not isinstance(value, dict) else "unknown section"
    fields = list(owner.model_fields) if owner else []
    kinds = [_tag(m) for m in _method_kinds() if key in m.model_fields] if section == "method" else []
    if kinds and owner:
        return f"{what} for method.kind {_tag(owner)!r}; {key} is a setting of kind {' or '.join(kinds)}"
    here = f"{section}.{key}".strip(".")
    elsewhere = [p for p in _all_paths() if p.rsplit(".", 1)[-1] == key and p != here][:2]
    alias, close = ALIASES.get(key.lower()), difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if not (alias or elsewhere or close):  # lerning_rate: a typo of a name from another tool
        typo = difflib.get_close_matches(key.lower(), list(ALIASES), n=1, cutoff=0.85)
        alias = ALIASES[typo[0]] if typo else None
    if alias and " " in alias:
        return f"{what}; {alias}"
    candidates = [alias] if alias else elsewhere or close
    if not candidates:
        return f"{what}; valid keys here: {', '.join(fields)}"
    shown = [c.rsplit(".", 1)[-1] if c.rpartition(".")[0] == section else c for c in candidates]
    return f"{what}; did you mean {' or '.join(repr(c) for c in shown)}?"


def _not_one_of(value: Any, choices: list[str]) -> str:
    text = f"{show(value)} is not one of: {', '.join(choices)}"
    if isinstance(value, bool):
        return f"{text}; YAML reads yes/no/on/off as true/false, so quote the value"
    norm = {re.sub(r"[-_ ]", "", c.lower()): c for c in choices}
    given = re.sub(r"[-_ ]", "", str(value).lower())
    close = difflib.get_close_matches(given, list(norm), n=1, cutoff=0.6)
    alias = VALUE_ALIASES.get(given)
    guess = alias if alias in choices else norm.get(given) or (norm[close[0]] if close else None)
    return f"{text}; did you mean {guess!r}?" if guess else text


def _all_paths(model: Any = JobSpec, prefix: str = "") -> list[str]:
    """Every key path of the schema (list items as `N`), for `did you mean 'train.lr'?` across sections."""
    paths = []
    for name, field in model.model_fields.items():
        ann = _unwrap(field.annotation)
        inner = f"{prefix}{name}.N." if get_origin(ann) is list else f"{prefix}{name}."
        ann = get_args(ann)[0] if get_origin(ann) is list else ann
        paths.append(f"{prefix}{name}")
        for sub in [ann] if _is_model(ann) else [m for m in get_args(ann) if _is_model(m)]:
            paths += [p for p in _all_paths(sub, inner) if p not in paths]
    return paths


def _method_kinds() -> list[Any]:
    return [m for m in get_args(_unwrap(JobSpec.model_fields["method"].annotation)) if _is_model(m)]


def _tag(model: Any) -> str:
    return get_args(model.model_fields["kind"].annotation)[0]


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _unwrap(ann: Any) -> Any:
    """Optional[X] → X."""
    args = [a for a in get_args(ann) if a is not type(None)] if _is_union(ann) else []
    return args[0] if len(args) == 1 else ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, pydantic.BaseModel)


def dotted(path: Loc) -> str:
    return ".".join(str(p) for p in path)


def got(value: Any) -> str:
    """What the user gave, for `expected X, got Y`: `the string 'abc'`, `a list [1, 2]`, `null`."""
    return GOT.get(type(value), "") + show(value)


def show(value: Any) -> str:
    """A value as it would be written in YAML, shortened."""
    text = (
        repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True, width=10**6)
    )
    text = text.strip().removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."
