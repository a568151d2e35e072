"""`sharpen plan` of a device: cuda job on a machine without a GPU: planned for GPUs elsewhere, its memory checked
against resources.gpu_memory_gb, a notice saying no real GPU was; `sharpen run` of it is still refused."""

from __future__ import annotations

import json

import pytest
import torch
from support.e2e import ALPACA, EXAMPLES, base_job, write_job

from launcher.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without a CUDA GPU")

LORA_24GB = str(EXAMPLES / "plans" / "llama3-8b-lora-1x24gb.yaml")
LOCAL = ["--set", "cluster.kind=local"]  # on the GPU machine itself, as the example's comment says


def test_a_cuda_job_is_planned_here_against_gpu_memory_gb(tmp_path, capsys):
    assert main(["plan", LORA_24GB, *LOCAL, "--output-dir", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert (
        "note: no CUDA GPU is visible here: planned for CUDA GPUs elsewhere (`sharpen run` needs a machine with one); "
        "nothing is checked against a real GPU, memory against resources.gpu_memory_gb: 24 (24.00 GiB a GPU, "
        "21.80 GiB usable): single fits with 20.71 GiB per GPU"
    ) in err
    assert "cuda (nccl), compute bf16" in out
    assert "memory per rank, GiB (GPU 24.0 GiB, 21.8 usable)" in out
    assert "not tokenized: no tokenizer loads from" in out  # configs/llama3-8b is config.json alone


def test_a_cuda_job_that_does_not_fit_gpu_memory_gb_says_by_how_much(tmp_path, capsys):
    assert main(["plan", LORA_24GB, *LOCAL, "--set", "resources.gpu_memory_gb=4", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the job fits no strategy on GPUs of 4.00 GiB (2.80 GiB usable): the closest, ")
    assert "hint: what would fit: " in err


def test_without_gpu_memory_gb_the_fit_is_not_checked(tmp_path, capsys):
    args = ["plan", LORA_24GB, *LOCAL, "--set", "resources.gpu_memory_gb=null", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "no CUDA GPU is visible here: planned for CUDA GPUs elsewhere" in err
    assert "nothing is checked against a real GPU\n" in err
    assert "memory per rank is estimated but not checked against a limit" in err
    assert "memory per rank, GiB (GPU memory unknown: not checked)" in out


def test_the_8b_examples_plan_here(capsys):
    """The 8-GPU one as on its GPU node (cluster.kind local), the SLURM one for the cluster's nodes."""
    for example, where in (("dpo-llama3-8b-8gpu", LOCAL), ("dpo-llama3-8b-slurm", [])):
        assert main(["plan", str(EXAMPLES / f"{example}.yaml"), *where, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["device"] == "cuda" and plan["chosen"]["fits"], example
        assert (plan["world_size"], plan["gpu_memory_bytes"]) == (8 if where else 16, 80 * 1024**3)


def test_running_a_cuda_job_here_is_refused(tiny_model, tmp_path, capsys):
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, ALPACA, device="cuda"))
    assert main(["run", str(job), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device: cuda was requested but no CUDA GPU is visible")
    assert "`sharpen plan` plans the job for GPUs without one" in err
    assert not (tmp_path / "run" / "plan.json").exists()
