"""A local model directory checked before launch: config.json readable, weights present and whole.

A rank that finds a broken model dir fails minutes into its start, once per rank; here each problem is one
UserError naming the file and the fix, before the data is tokenized. A hub id is left to the loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from launcher.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
REWRITE = "copy the model directory again (or write it with save_pretrained)"


def check_model_dir(path: str, key: str = "model.path") -> None:
    """Raise a UserError for the first problem of the model directory at `path`; nothing for a hub id."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        if path.startswith(("/", "./", "../", "~")) or directory.exists():
            raise UserError(f"{key}: {path} is not a directory", "give a model directory or a hub id (org/name)")
        return  # a hub id: the loader downloads and checks it
    _read_json(directory / "config.json", key, "a Hugging Face model directory holds config.json beside its weights")
    for shard in weight_files(directory, key):
        if shard.suffix == ".safetensors":
            check_safetensors(shard, key)


def weight_files(directory: Path, key: str = "model.path") -> list[Path]:
    """The weight files of a model directory, checked to exist: model.safetensors, the shards of a sharded
    index, or pytorch_model*.bin."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index, key, REWRITE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{key}: {index} has no weight_map naming its shards", REWRITE)
            shards = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise UserError(
                    f"{key}: {index} names {len(shards)} shard(s), {len(missing)} of them missing: "
                    + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""),
                    f"copy the missing shard(s) into {directory}",
                )
            return shards
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise UserError(
        f"{key}: {directory} has config.json but no weights (model.safetensors, {SAFETENSORS_INDEX} with its "
        "shards, or pytorch_model*.bin)",
        f"copy the weight files into {directory}, or point {key} at the directory that holds them",
    )


def check_safetensors(path: Path, key: str = "model.path") -> None:
    """The file's header reads and its tensors' bytes are all there (a truncated copy is named)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{key}: {path} is truncated ({size} bytes: not even a safetensors header)", REWRITE)
        (header_size,) = struct.unpack("<Q", head)
        if 8 + header_size > size:
            raise UserError(
                f"{key}: {path} is truncated: its header alone needs {8 + header_size:,} bytes, the file has {size:,}",
                REWRITE,
            )
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{key}: {path} is not a safetensors file (its header does not read: {e})", REWRITE) from None
    if not isinstance(header, dict):
        raise UserError(f"{key}: {path} is not a safetensors file (its header is not a JSON object)", REWRITE)
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__" and isinstance(t, dict)]
    needed = 8 + header_size + max(ends, default=0)
    if needed > size:
        raise UserError(
            f"{key}: {path} is truncated: its tensors need {needed:,} bytes, the file has {size:,}", REWRITE
        )


def _read_json(path: Path, key: str, fix: str) -> dict:
    if not path.is_file():
        raise UserError(f"{key}: {path} is missing", fix)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{key}: {path} does not read as JSON: {e}", fix) from None
    if not isinstance(value, dict):
        raise UserError(f"{key}: {path} is not a JSON object", fix)
    return value
