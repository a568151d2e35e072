"""The rendered sbatch script against its golden files, and `sharpen submit` where there is no sbatch."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support import slurm_job
from support.e2e import assert_ok, sharpen

from cluster import slurm
from launcher.errors import UserError
from launcher.planner import build_plan
from launcher.shapes import ParamCounts
from launcher.spec import JobSpec
from training.env_hooks import UPDATE_GOLDEN

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
job_file = slurm_job.job_file


GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


# -- the rendered script ------------------------------------------------------------------------------


def golden_plan(launch: str):
    slurm_spec = {
        "partition": "gpu", "account": "proj42", "qos": "high", "time": "2-00:00:00", "constraint": "h100",
        "cpus_per_task": 12, "mem": "480G", "exclusive": True, "gpu_flag": "gres",
        "extra_sbatch": ["--mail-type=END", "#SBATCH --reservation=llm"],
        "setup": ["module load cuda/12.4", 'echo "job $SLURM_JOB_ID on $(hostname)"'],
        "signal_lead_s": 300, "requeue": True, "max_requeues": 5, "launch": launch,
    }  # fmt: skip
    spec = JobSpec.model_validate(
        {
            "name": "llama3-8b-lora",
            "model": {"path": "meta-llama/Meta-Llama-3-8B"},
            "data": {"train": [{"path": "data/train.jsonl"}]},
            "train": {"global_batch_size": 128, "micro_batch_size": 4},
            "strategy": {"name": "fsdp"},
            "resources": {"nodes": 2, "gpus_per_node": 8},
            "cluster": {"kind": "slurm", "slurm": slurm_spec},
        }
    )
    counts = ParamCounts(8_000_000_000, 8_000_000_000, 0, 0, 32, 4096, 128256)
    plan, _ = build_plan(spec, Path("/scratch/runs/llama3-8b-lora"), device="cuda", counts=counts)
    return plan


@pytest.mark.parametrize("launch,golden", [("agent", "job.sbatch"), ("task_per_rank", "job-task-per-rank.sbatch")])
def test_sbatch_script_matches_golden_file(launch, golden):
    """A change to the script is a reviewed diff: regenerate with SHARPEN_UPDATE_GOLDEN=1 and read it."""
    rendered = slurm.render_sbatch(golden_plan(launch), python="/opt/sharpen/venv/bin/python")
    path = GOLDEN / golden
    if os.environ.get(UPDATE_GOLDEN):
        path.write_text(rendered)
    assert rendered == path.read_text()


def test_the_stop_signal_is_the_one_the_job_names():
    plan = golden_plan("agent")
    job = plan.job
    job["cluster"]["slurm"]["signal"] = "URG"
    script = slurm.render_sbatch(plan.model_copy(update={"job": job}), python="python")
    assert "#SBATCH --signal=B:URG@300" in script and "touch \"$STOP_FILE\"' URG" in script
    assert "USR2" not in script


def test_cpu_jobs_ask_for_no_gpus_and_bad_extra_options_are_refused():
    plan = golden_plan("agent")
    cpu_plan = plan.model_copy(update={"device": "cpu"})
    assert not any(re.match(r"#SBATCH --(gres|gpus)", line) for line in slurm.sbatch_lines(cpu_plan))
    job = plan.job
    job["cluster"]["slurm"]["extra_sbatch"] = ["reservation=llm"]
    with pytest.raises(UserError, match=r"extra_sbatch.0: 'reservation=llm' is not an sbatch option"):
        slurm.render_sbatch(plan.model_copy(update={"job": job}))


# -- against the real cluster ---------------------------------------------------------------------------


def test_submit_without_sbatch_on_path_exits_2(job_file, tmp_path):
    result = sharpen("submit", str(job_file), "--output-dir", str(tmp_path / "run"), env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "no sbatch on PATH" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    dry = sharpen("submit", str(job_file), "--dry-run", "--output-dir", str(tmp_path / "dry"), env={"PATH": str(tmp_path)})
    assert_ok(dry)
    assert "#SBATCH --nodes=2" in (tmp_path / "dry" / slurm.SCRIPT).read_text()
    assert (tmp_path / "dry" / "plan.json").is_file() and not (tmp_path / "dry" / slurm.JOB_ID_FILE).exists()
