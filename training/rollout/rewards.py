"""Reward functions: imported from `path/to/file.py:name` or `package.module:name`, and checked against
TRL's calling convention before any rank starts. Torch-free, so the launcher checks them cheaply."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Collection
from pathlib import Path

from launcher.method_spec import REWARD_FUNCTION

# What every reward function is given, by keyword as TRL's GRPOTrainer calls it: the prompts, the
# completions, the completions' token ids; then each of the data's other columns.
PROMPTS, COMPLETIONS, COMPLETION_IDS = "prompts", "completions", "completion_ids"
ALWAYS_PASSED = (PROMPTS, COMPLETIONS, COMPLETION_IDS)
SIGNATURE = "fn(prompts, completions, **kwargs) -> list[float | None]"
_loaded: dict[str, object] = {}  # module name -> module: a file is executed once per process


class RewardLoadError(Exception):
    """A reward function that cannot be used: what is wrong, and what to do about it."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


def is_file_source(source: str) -> bool:
    """`rewards.py` and `dir/rewards.py` name files; `pkg.rewards` names a module."""
    return source.endswith(".py") or "/" in source or "\\" in source


def resolve_reference(text: str, base: Path | None) -> str:
    """`file.py:name` with the file's path made absolute (relative to `base`, the job file's directory)."""
    match = REWARD_FUNCTION.match(text)
    if not match or not is_file_source(match["source"]):
        return text
    path = Path(match["source"]).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return f"{path.resolve() if path.exists() else match['source']}:{match['name']}"


def load_reward_function(text: str, base: Path | None = None) -> Callable:
    """The callable `text` names; RewardLoadError when the file or module, or the name in it, is not usable."""
    match = REWARD_FUNCTION.match(text)
    if not match:
        raise RewardLoadError(f"{text!r} is not path/to/file.py:name or package.module:name", "e.g. rewards.py:correct")
    source, name = match["source"], match["name"]
    module = _import_file(source, base) if is_file_source(source) else _import_module(source, base)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        shown = f"; it defines {', '.join(public[:8])}" if public else ""
        raise RewardLoadError(f"{source} has no {name!r}{shown}", f"the part after ':' names a function in {source}")
    fn = getattr(module, name)
    if not callable(fn):
        raise RewardLoadError(f"it names {type(fn).__name__} {fn!r:.40}, not a function", f"a reward function is {SIGNATURE}")
    if inspect.iscoroutinefunction(fn):
        raise RewardLoadError("it is async; sharpen calls reward functions synchronously",
                              "write it as a plain def (run its awaits with asyncio.run inside)")
    return fn


def signature_problem(fn: Callable, columns: Collection[str] | None) -> str | None:
    """Why `fn` cannot be called as TRL calls a reward function (by keyword: prompts=, completions=,
    completion_ids=, and one keyword per data column), or None. columns None: the data's are unknown."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: let the first call tell
        return None
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = {*ALWAYS_PASSED, *(columns or ())}
    for p in params:
        if p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            return f"its argument {p.name!r} is positional-only; arguments are passed by keyword"
        if columns is not None and p.name not in given:
            have = ", ".join(sorted(columns)) or "none"
            return (f"its argument {p.name!r} gets no value: it is not prompts, completions or completion_ids, "
                    f"nor a column of the data (its other columns: {have})")
    if COMPLETIONS not in named and not var_keyword:
        return "it takes no 'completions' argument (nor **kwargs)"
    return None


def accepted_arguments(fn: Callable) -> set[str] | None:
    """The keywords `fn` takes by name; None when it takes **kwargs (then it gets every column)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_reward_function(text: str, base: Path | None, columns: Collection[str] | None) -> tuple[str, str] | None:
    """(problem, hint) when `text` does not name a usable reward function, else None."""
    try:
        fn = load_reward_function(text, base)
    except RewardLoadError as e:
        return e.message, e.hint
    problem = signature_problem(fn, columns)
    return (problem, f"a reward function is {SIGNATURE}, as in TRL") if problem else None


def _import_file(source: str, base: Path | None) -> object:
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise RewardLoadError(f"{path} {where}", "give the Python file that defines the function, relative to the job file")
    path = path.resolve()
    # One module per file, named by its path: two rewards.py in different directories stay apart.
    module_name = f"sharpen_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if module_name in _loaded:
        return _loaded[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # The file may import its neighbours while it is imported; only then, so that whether a later
    # `module:name` reward imports does not depend on which files were loaded before it.
    sys.path.insert(0, str(path.parent))
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[module_name]
        raise RewardLoadError(f"importing {path} raised {_what_raised(e, path)}", "fix the file; run `python FILE` to see the traceback") from None
    finally:
        sys.path.remove(str(path.parent))
    _loaded[module_name] = module
    return module


def _import_module(source: str, base: Path | None) -> object:
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        if e.name and source.startswith(e.name):  # the module itself, not something it imports
            beside = (base or Path.cwd()) / (source.replace(".", "/") + ".py")
            hint = (f"{beside.name} is beside the job file: write {beside.name}:NAME" if beside.is_file()
                    else "install the package, or give a file: path/to/file.py:NAME")
            raise RewardLoadError(f"no module named {source!r}", hint) from None
        raise RewardLoadError(f"importing {source} raised {_what_raised(e, None)}", "install what it imports") from None
    except (Exception, SystemExit) as e:
        raise RewardLoadError(f"importing {source} raised {_what_raised(e, None)}", "fix the module") from None


def _what_raised(e: BaseException, path: Path | None) -> str:
    """`NameError: name 'x' is not defined (line 3)`: the exception and where in the user's file it rose."""
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    if line is None and path is not None:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
        line = frames[-1].lineno if frames else None
    text = e.msg if isinstance(e, SyntaxError) else str(e)
    return f"{type(e).__name__}: {text}" + (f" (line {line})" if line else "")
