"""The model a user wants to try after training (SOURCE of `sharpen generate`, `chat` and `eval`), found and loaded.

SOURCE is a run dir (its final/, or `--checkpoint step-N` of any strategy's checkpoint, read as `sharpen
export` reads it), an export dir (sharpen-export.json: full, merged or adapter weights), a PEFT adapter dir,
or a plain Hugging Face model dir or hub id, optionally with `--adapter DIR`. `check_source` decides which
from the files alone (no torch), so a wrong SOURCE is one UserError before anything heavy loads;
`load_source` then builds the model in eval mode, with the tokenizer (and chat template) it was trained with.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError

PLAN_FILE = "plan.json"  # launcher/plan.py's; not imported here so that the check stays pydantic-free
EXPORT_MARKER = "sharpen-export.json"  # launcher/commands/export.py's MARKER
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
PLAIN_STOP = "\nUser:"  # without a template, the model's own next "User:" line ends its answer
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOOKED_FOR = (
    f"a run dir ({PLAN_FILE}), an export dir ({EXPORT_MARKER}), a model dir (config.json), "
    f"an adapter dir ({ADAPTER_CONFIG}) or a hub id (org/name)"
)


@dataclass
class Source:
    """A model ready to generate: in eval mode on its device, its tokenizer (a pad token set), the chat
    template prompts are formatted with (None: the text is used as is), and one line saying what it is."""

    model: Any
    tokenizer: Any
    chat_template: str | None
    describe: str
    run_dir: Path | None


@dataclass(frozen=True)
class Located:
    """What SOURCE is, from its files: `kind` is run-final, run-checkpoint, model or adapter; `model` the
    weights dir or hub id to load, `adapter` a PEFT adapter over it, `base` the model an adapter needs."""

    kind: str
    model: str
    run_dir: Path | None = None
    checkpoint: str | None = None
    adapter: Path | None = None
    describe: str = ""


def add_source_arguments(parser) -> None:
    """SOURCE and the options that pick and place its weights."""
    parser.add_argument("source", metavar="SOURCE", help="a run dir, an export dir, a model dir or a hub id")
    parser.add_argument(
        "--checkpoint", metavar="step-N", help="a run's checkpoint instead of its final/ (any strategy's)"
    )
    parser.add_argument("--adapter", metavar="DIR", help="a PEFT adapter dir over a model dir or hub id")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when there is one")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on cuda, fp32 on cpu")


def source_from_args(args) -> Source:
    """load_source of add_source_arguments' arguments."""
    return load_source(args.source, args.checkpoint, args.adapter, args.device, args.dtype)


def check_source(source: str, checkpoint: str | None = None, adapter: str | None = None) -> Located:
    """What SOURCE is, from its files alone (no torch): a UserError naming what was looked for otherwise."""
    path = Path(source).expanduser()
    if adapter is not None and not (Path(adapter).expanduser() / ADAPTER_CONFIG).is_file():
        raise UserError(f"--adapter {adapter}: not a PEFT adapter dir (no {ADAPTER_CONFIG})")
    if checkpoint is not None and not (path / PLAN_FILE).is_file():
        raise UserError(f"--checkpoint {checkpoint}: {source} is not a run dir (no {PLAN_FILE})")
    if path.is_dir():
        if (path / PLAN_FILE).is_file():
            if adapter is not None:
                raise UserError(f"--adapter: {source} is a run dir, which has its own weights")
            return _locate_run(path, checkpoint)
        if (path / EXPORT_MARKER).is_file() or (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file():
            return _locate_weights(path, adapter)
        raise UserError(f"{source}: is not {LOOKED_FOR}", "point SOURCE at a run dir, or at what `sharpen export` wrote")
    if path.exists():
        raise UserError(f"{source}: is a file, not {LOOKED_FOR}")
    first = Path(source).parts[0] if Path(source).parts else source
    if source.startswith(("/", "./", "../", "~")) or Path(first).is_dir() or not HUB_ID.match(source):
        raise UserError(f"{source}: no such directory, and not a hub id; looked for {LOOKED_FOR}")
    describe = f"hub model {source}" + (f" with adapter {adapter}" if adapter else "")
    return Located("model", source, adapter=Path(adapter) if adapter else None, describe=describe)


def _locate_run(run_dir: Path, checkpoint: str | None) -> Located:
    plan = _read_json(run_dir / PLAN_FILE)
    job = plan.get("job", {})
    method = job.get("method", {}).get("kind", "sft")
    if method == "reward":
        raise UserError(f"{run_dir}: a reward model run: it scores text, it does not generate it")
    finetune = job.get("finetune", {}).get("type", "full")
    base = job.get("model", {}).get("path", "?")
    shown = _short(base)
    if checkpoint is not None:
        name = f"step-{checkpoint}" if checkpoint.isdigit() else checkpoint
        found = run_dir / "checkpoints" / name
        if not found.is_dir():
            have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
            raise UserError(f"--checkpoint {checkpoint}: {found} does not exist", f"checkpoints: {', '.join(have) or 'none'}")
        return Located("run-checkpoint", base, run_dir, name, describe=f"{run_dir} checkpoint {name} ({finetune} on {shown})")
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(
            f"{run_dir}: no final/ (the run has not finished)",
            "try one of its checkpoints with --checkpoint step-N (`ls " + str(run_dir / "checkpoints") + "`)",
        )
    if (final / ADAPTER_CONFIG).is_file():
        return Located("run-final", base, run_dir, describe=f"{run_dir} final/ ({finetune} adapter on {shown})")
    return Located("model", str(final), run_dir, describe=f"{run_dir} final/ (full weights, fine-tuned from {shown})")


def _locate_weights(path: Path, adapter: str | None) -> Located:
    export = _read_json(path / EXPORT_MARKER) if (path / EXPORT_MARKER).is_file() else None
    origin = f" of {export.get('run_dir', '?')} {export.get('checkpoint', '')}".rstrip() if export else ""
    what = "export" if export else "model dir"
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        if adapter is not None:
            raise UserError(f"--adapter: {path} is an adapter dir already; give its base model as SOURCE")
        base = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path / ADAPTER_CONFIG}: names no base_model_name_or_path", "give the base as SOURCE and this dir as --adapter")
        kind = "adapter export" if export else "adapter"
        return Located("model", base, adapter=path, describe=f"{path} ({kind}{origin}, over {base})")
    from launcher.model_dir import check_model_dir

    check_model_dir(str(path), "SOURCE")
    kind = f"{export.get('kind', 'full')} export{origin}" if export else what
    describe = f"{path} ({kind})" + (f" with adapter {adapter}" if adapter else "")
    return Located("model", str(path), adapter=Path(adapter) if adapter else None, describe=describe)


def _short(path: str) -> str:
    """A plan's absolute model path as the user would type it from here: relative when under the cwd."""
    try:
        return str(Path(path).relative_to(Path.cwd())) if Path(path).is_absolute() else path
    except ValueError:
        return path


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: does not read as JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: is not a JSON object")
    return value


def load_source(
    source: str, checkpoint: str | None = None, adapter: str | None = None, device: str = "auto", dtype: str = "auto"
) -> Source:
    """SOURCE's model in eval mode on `device` (auto: cuda when there is one) in `dtype`, and its tokenizer."""
    located = check_source(source, checkpoint, adapter)
    import torch

    if device not in DEVICES or dtype not in DTYPES:
        raise UserError(f"--device {device} / --dtype {dtype}: choose from {DEVICES} / {DTYPES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible", "use --device cpu")
    place = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if dtype == "auto":
        dtype = "bf16" if place.type == "cuda" else "fp32"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bar, on the terminal a user reads
    with warnings.catch_warnings():  # PEFT's calls of transformers' deprecated names: not the user's to fix
        warnings.simplefilter("ignore", FutureWarning)
        if located.kind in ("run-final", "run-checkpoint"):
            model, tokenizer = _load_run(located, place)
        else:
            model, tokenizer = _load_weights(located, torch_dtype)
    model.to(device=place, dtype=torch_dtype)
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = tokenizer.chat_template
    if isinstance(template, dict):  # a tokenizer with several named templates: the default one
        template = template.get("default")
    return Source(model, tokenizer, template or None, f"{located.describe} on {place.type}, {dtype}", located.run_dir)


def _load_run(located: Located, place) -> tuple[Any, Any]:
    """The run's module as trained (export's build_model: its PEFT config, modules_to_save included), filled
    from final/'s adapter or from a checkpoint by the offline reader of the strategy that wrote it."""
    from launcher.commands.export import build_model, choose_checkpoint
    from launcher.plan import Plan

    spec = Plan.read(located.run_dir).spec
    model_section = {"compile": False}  # an eager forward: generation's shapes change at every step
    if spec.model.attention == "flash_attention_2" and place.type != "cuda":
        model_section["attention"] = "sdpa"
    spec = spec.model_copy(update={"model": spec.model.model_copy(update=model_section)})
    peft = spec.finetune.type != "full"
    if located.kind == "run-checkpoint":
        _, path = choose_checkpoint(located.run_dir, located.checkpoint)
        from strategies.full_weights import load_full_weights

        model, tokenizer = build_model(spec)
        load_full_weights(model, path, peft)
        return model, tokenizer
    final = located.run_dir / "final"
    model, _ = build_model(spec)
    _load_adapter_weights(model, final)
    return model, _tokenizer(final)


def _load_adapter_weights(model, adapter_dir: Path) -> None:
    """An adapter dir's weights into a PEFT model built with the same config; every trained weight must be there."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter_dir), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"{adapter_dir}: holds weights the run's model does not have, e.g. {unexpected[:3]}")


def _load_weights(located: Located, torch_dtype) -> tuple[Any, Any]:
    """A model dir or hub id, with a PEFT adapter over it when there is one."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(located.model, dtype=torch_dtype)
    except OSError as error:  # not on the hub, no network, or a broken dir
        raise UserError(f"cannot load {located.model}: {error}".splitlines()[0], f"SOURCE is one of {LOOKED_FOR}") from None
    tokenizer_dir = located.model
    if located.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(located.adapter))
        if (located.adapter / "tokenizer_config.json").is_file():  # sharpen's adapters carry the run's tokenizer
            tokenizer_dir = str(located.adapter)
    return model, _tokenizer(tokenizer_dir)


def _tokenizer(directory) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except OSError as error:
        raise UserError(f"cannot load a tokenizer from {directory}: {error}".splitlines()[0]) from None


def format_prompt(source: Source, prompt: str | list[dict]) -> str:
    """The text the model continues: a message list (or a text, as one user message) through the chat
    template with the assistant's turn opened; a text as is when there is no template."""
    if isinstance(prompt, str) and source.chat_template is None:
        return prompt
    if source.chat_template is None:
        raise UserError(f"{source.describe}: has no chat template, so a message list cannot be formatted", "give the prompt as text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return source.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=source.chat_template)


def end_of_turn(tokenizer: Any, chat_template: str | None, model: Any = None) -> tuple[list[int], str | None]:
    """What ends an answer: the tokenizer's EOS, and how the chat template closes an assistant turn: its
    special token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...) among the ids, or, where that is plain
    text to this tokenizer (a built-in template on a tokenizer without its tokens), that text as a stop
    string. Without a template: the model's own next "User:" line. With `model`, its generation config's EOS
    ids too. One rule for `sharpen generate` (which uses the ids) and `sharpen chat` (both)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    ids.discard(None)
    if chat_template is None:
        return sorted(ids), PLAIN_STOP
    marker = "sharpen-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False, chat_template=chat_template,
        )
    except Exception:  # a template that refuses this conversation: the EOS alone
        text = ""
    closing = text.split(marker, 1)[1].strip().split("\n")[0].strip() if marker in text else ""
    stop = None
    if closing:
        first = tokenizer(closing, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tokenizer.all_special_ids):
            ids.add(first[0])
        else:
            stop = closing
    return sorted(int(t) for t in ids), stop
