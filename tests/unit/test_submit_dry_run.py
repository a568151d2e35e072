"""`sharpen submit --dry-run` where the cluster's files are not at hand: the sbatch script is written without
tokenizing, and says so; a real submit refuses a missing tokenizer before sbatch."""

from __future__ import annotations

import json
import shutil

import pytest
from support.e2e import ALPACA, EXAMPLES, base_job

from cluster import slurm
from launcher.cli import main
from launcher.errors import UserError
from launcher.prepare import prepare_run
from launcher.spec import JobSpec


def test_dry_run_of_the_8b_example_writes_the_script_without_tokenizing(tmp_path, capsys):
    """configs/llama3-8b is config.json alone (no weights, no tokenizer) and the data is a hub dataset (offline)."""
    run_dir = tmp_path / "run"
    assert main(["submit", str(EXAMPLES / "dpo-llama3-8b-slurm.yaml"), "--dry-run", "--output-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "note: dry run: model.path: " in err and "has config.json but no weights" in err
    assert "note: dry run: not tokenized: no tokenizer loads from " in err and "a real submit tokenizes first" in err
    assert out == "dry run: not submitted, data not tokenized; `sharpen submit` without --dry-run tokenizes and submits\n"
    script = (run_dir / slurm.SCRIPT).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gres=gpu:8" in script and "module load cuda/12.4" in script
    assert json.loads((run_dir / "plan.json").read_text())["data_cache"] is None
    assert not (run_dir / "data_cache").exists()


@pytest.fixture
def no_tokenizer_model(tiny_model, tmp_path):
    """The tiny model's config and weights, without its tokenizer."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, model / name)
    return model


def test_a_real_submit_without_a_tokenizer_fails_before_sbatch(no_tokenizer_model, tmp_path, capsys):
    """cmd_submit prepares the run dir (prepare_run) before it calls sbatch; a dry run of it writes the plan."""
    job = base_job(no_tokenizer_model, ALPACA, cluster={"kind": "slurm"})
    spec = JobSpec.model_validate(job)
    with pytest.raises(UserError) as error:
        prepare_run(spec, tmp_path / "run", device="cpu", cache_root=tmp_path / "cache")
    assert error.value.message.startswith(f"cannot load the tokenizer {str(no_tokenizer_model)!r}")
    assert error.value.hint.startswith("model.tokenizer: a directory")
    assert not (tmp_path / "run" / "plan.json").exists()
    plan = prepare_run(spec, tmp_path / "dry", device="cpu", cache_root=tmp_path / "cache", dry_run=True)
    assert plan.data_cache is None and (tmp_path / "dry" / "plan.json").is_file()
    assert f"not tokenized: no tokenizer loads from {no_tokenizer_model} here" in capsys.readouterr().err
