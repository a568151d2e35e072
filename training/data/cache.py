"""The tokenize-once cache: a key of everything that changes the tokenized data, one builder per key
across the processes and nodes that share the cache directory, and loading what was built.

A finished entry is the directory `ROOT/<cache_key>` holding META_FILE (the builder writes it last); the
evaluation rows, when the job has some, are its EVAL_DIR. training/data/prepare.py builds the entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from launcher.errors import UserError
from launcher.spec import DataSpec, mixing
from training.data.formats import source_files
from training.heartbeat import pid_alive

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.cache/sharpen/tokenized"  # when neither data.cache_dir nor a cache_root is given
# Bump when the stored layout or the tokenization rules change: old caches then stop matching.
PIPELINE_VERSION = 2  # 2: META_FILE lists each data.train entry's records, samples, tokens and rows
META_FILE = "sharpen-data.json"
EVAL_DIR = "eval"  # the evaluation rows (data.eval, data.eval_split), inside the training data's directory
EVAL_SPLIT_SEED = 0  # which rows data.eval_split holds out: fixed, so every run of the same data agrees
CONTENT_HASH_MAX_BYTES = 32 << 20
LOCK_HEARTBEAT_S = 5.0
LOCK_STALE_S = 120.0
builds_in_this_process = 0  # how many times this process built a cache entry (cache misses it tokenized)


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= CONTENT_HASH_MAX_BYTES:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _tokenizer_fingerprint(tokenizer_path: str, trust_remote_code: bool) -> str:
    path = Path(tokenizer_path).expanduser()
    if path.is_dir():
        names = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template", "spiece")
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(names))
        if files:
            return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)  # a hub id: fingerprint what it loads to
    state = [type(tokenizer).__name__, str(tokenizer.chat_template), tokenizer.special_tokens_map]
    if tokenizer.is_fast:
        state.append(tokenizer.backend_tokenizer.to_str())
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def load_tokenizer(tokenizer_path: str, trust_remote_code: bool):
    """The tokenizer at `tokenizer_path` (a directory or a hub id); a UserError when it does not load."""
    from transformers import AutoTokenizer

    hint = "model.tokenizer: a directory (tokenizer.json or tokenizer_config.json in it) or hub id that holds one"
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer {tokenizer_path!r}: {e}", hint) from e
    # transformers builds some tokenizers (Qwen2's) from a config.json alone, with no vocabulary
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer {tokenizer_path!r} has no vocabulary: it encodes text to no tokens", hint)
    return tokenizer


def cache_key(
    data: DataSpec, method_kind: str, tokenizer_path: str, train_on: str, trust_remote_code: bool,
    chat_template: str | None = None,
) -> str:
    """Hash of everything that changes the tokenized output (file contents, not just names; the text of
    model.chat_template, when the job sets one)."""

    def files_key(section: str) -> list:
        files = []
        for i, file in enumerate(getattr(data, section)):
            local = source_files(i, file, section)
            content = [[str(p.resolve()), _fingerprint(p)] for p in local] if local is not None else "hub"
            mapped = [file.columns, file.roles] if file.columns or file.roles else []  # jobs without keep their keys
            files.append([file.path, file.format, file.split, file.field, content, *mapped])
        return files

    inputs = {
        "version": PIPELINE_VERSION, "files": files_key("train"), "method": method_kind, "train_on": train_on,
        "tokenizer": _tokenizer_fingerprint(tokenizer_path, trust_remote_code),
        **({"chat_template": chat_template} if chat_template is not None else {}),  # jobs without keep their keys
        "max_length": data.max_length, "packing": data.packing, "truncation": data.truncation,
    }
    if data.packing and mixing([f.weight for f in data.train]):
        inputs["packed_per_source"] = True  # a mix: each source packed apart (training/data/sampler.py)
    if data.eval or data.eval_split:  # only then: caches of jobs without eval data keep their keys
        inputs["eval"] = {"files": files_key("eval"), "split": data.eval_split, "seed": EVAL_SPLIT_SEED}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def load_prepared(path: Path):
    """The dataset prepare_dataset wrote, memory-mapped (nothing is read into RAM until used)."""
    import datasets

    if not (Path(path) / META_FILE).exists():
        raise UserError(f"{path} is not a dataset written by prepare_dataset (no {META_FILE})")
    return datasets.load_from_disk(str(path))


def prepared_meta(path: Path) -> dict:
    """What the builder recorded of a cache entry: rows, tokens, stats, and `sources` (prepared_sources)."""
    return json.loads((Path(path) / META_FILE).read_text())


def prepared_sources(path: Path) -> list[dict]:
    """Each data.train entry as prepared: path, records, samples, tokens, and its rows (contiguous, in order;
    None when packing laid several sources in one row)."""
    return prepared_meta(path)["sources"]


def load_prepared_eval(path: Path):
    """The evaluation rows prepare_dataset wrote next to the training rows, or None when the job has none."""
    import datasets

    load_prepared(path)  # the same checks
    eval_dir = Path(path) / EVAL_DIR
    return datasets.load_from_disk(str(eval_dir)) if eval_dir.is_dir() else None


# ---------------------------------------------------------------- one builder, many waiters


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(directory)` unless it is there: the one process that takes the lock builds
    into a temporary directory and renames it into place, the others poll for it (no collective). A build
    that fails on the data (UserError) leaves its message for the waiters, which raise it too."""
    global builds_in_this_process
    final.parent.mkdir(parents=True, exist_ok=True)
    lock, error = final.with_name(final.name + ".lock"), final.with_name(final.name + ".error")
    started, delay = time.time(), 0.05
    while True:
        if (final / META_FILE).exists():
            return final
        if _try_lock(lock):
            stop = threading.Event()
            threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True).start()
            tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                if not (final / META_FILE).exists():
                    error.unlink(missing_ok=True)
                    try:
                        build(tmp / "dataset")
                    except UserError as e:
                        error.write_text(str(e))
                        raise
                    builds_in_this_process += 1
                    _publish(tmp / "dataset", final)
                return final
            finally:
                stop.set()
                shutil.rmtree(tmp, ignore_errors=True)
                lock.unlink(missing_ok=True)
        if error.exists() and error.stat().st_mtime >= started - 1:
            raise UserError(error.read_text())  # the build we waited for failed on the data: same message
        _break_if_stale(lock)
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _try_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT_S):
        try:
            os.utime(lock)
        except OSError:
            return


def _break_if_stale(lock: Path) -> None:
    """Remove a lock whose builder died: same host and its pid is gone, or no heartbeat for LOCK_STALE_S.

    Renaming first makes the removal atomic; if two waiters both break and both build, the second
    rename into place fails and that copy is discarded, so the cache stays one consistent directory.
    """
    try:
        host, pid = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return
    dead = host == socket.gethostname() and not pid_alive(int(pid))
    if dead or age > LOCK_STALE_S:
        logger.warning("removing the stale lock %s (builder %s:%s gone)", lock, host, pid)
        stale = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(lock, stale)
            stale.unlink()
        except OSError:
            return
        for leftover in lock.parent.glob(f".{lock.name.removesuffix('.lock')}.tmp-{host}-{pid}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # the dead builder's half-written directory


def _publish(built: Path, final: Path) -> None:
    try:
        os.rename(built, final)
    except OSError:
        if not (final / META_FILE).exists():
            raise  # not a lost race: a real failure
