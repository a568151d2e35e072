"""What `sharpen run` refuses before a rank starts, through the real CLI: data that is not UTF-8 or not JSON
(file and line named), a model directory without weights or with a truncated safetensors file; and the
model-dir checks (launcher/model_dir.py) in process for the sharded layouts."""

from __future__ import annotations

import json
import shutil

import pytest
from support.e2e import ALPACA, base_job, sharpen, write_job

from launcher.errors import UserError
from launcher.model_dir import check_model_dir


def refused(tmp_path, job: dict, capsys=None) -> str:
    """`sharpen run JOB`'s stderr, asserting exit 2, one error message and no traceback, and no run started:
    in a new process, or with `capsys` in this one (the same main(), a second or two instead of ten)."""
    tmp_path.mkdir()
    run_dir = tmp_path / "run"
    args = ("run", str(write_job(tmp_path / "job.yaml", job)), "--output-dir", str(run_dir))
    if capsys is None:
        result = sharpen(*args)
        code, stderr = result.returncode, result.stderr
    else:
        from launcher.cli import main

        capsys.readouterr()
        code, stderr = main(list(args)), capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    assert [line for line in stderr.splitlines() if not line.startswith(("note:", "error:", "  hint:"))] == [], stderr
    assert not (run_dir / "plan.json").exists() and not (run_dir / "logs").exists()
    return stderr


def test_bad_bytes_and_a_broken_line_name_the_file_and_line(tiny_model, tmp_path, capsys):
    good = ALPACA.read_bytes().splitlines(keepends=True)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b"".join(good[:3]) + '{"instruction": "Caf\u00e9?", "output": "oui"}\n'.encode("latin-1"))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"".join(good[:2]) + b'{"instruction": "x", "output": "y"\n' + b"".join(good[2:4]))
    err = refused(tmp_path / "a", base_job(tiny_model, tmp_path / "x.jsonl",
                                           data={"train": [{"path": str(ALPACA)}, {"path": str(latin1)}]}))
    assert f"data.train[1] ({latin1})" in err and "line 4: not UTF-8 text (byte 0xe9" in err, err
    err = refused(tmp_path / "b", base_job(tiny_model, broken), capsys)
    assert f"({broken})" in err and "line 3:" in err, err


def test_a_model_dir_without_weights_or_with_a_truncated_file_is_named(tiny_model, tmp_path, capsys):
    weightless = shutil.copytree(tiny_model, tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    err = refused(tmp_path / "a", base_job(weightless, ALPACA), capsys)
    assert f"model.path: {weightless} has config.json but no weights" in err, err
    truncated = shutil.copytree(tiny_model, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = refused(tmp_path / "b", base_job(truncated, ALPACA))
    assert f"model.path: {weights} is truncated" in err and "copy the model directory again" in err, err


def test_sharded_indexes_and_configs(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "sharded")
    check_model_dir(str(model))  # the tiny model as saved: fine
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    names = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    with pytest.raises(UserError, match=r"names 2 shard\(s\), 1 of them missing: model-00002-of-00002\.safetensors"):
        check_model_dir(str(model))
    shutil.copy(model / "model-00001-of-00002.safetensors", model / "model-00002-of-00002.safetensors")
    check_model_dir(str(model))
    (model / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config\.json does not read as JSON"):
        check_model_dir(str(model))
    (model / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json is missing"):
        check_model_dir(str(model))
    check_model_dir("meta-llama/Meta-Llama-3-8B")  # a hub id: left to the loader
    with pytest.raises(UserError, match="is not a directory"):
        check_model_dir(str(tmp_path / "nowhere"))
