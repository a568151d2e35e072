"""What `sharpen run` settles before a rank starts: the plan it prints, a device it refuses, and the model
handed to the strategies in training mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.e2e import ALPACA, assert_ok, base_job, sharpen, write_job
from support.run_job import two_ranks


def test_the_model_is_loaded_in_training_mode(tiny_model):
    """from_pretrained hands back an eval-mode model; in it LoRA dropout is a no-op and transformers skips
    gradient checkpointing. load_model must give the strategies a model in training mode."""
    from launcher.spec import JobSpec
    from training.model import load_model

    job = base_job(
        tiny_model, ALPACA, model={"path": str(tiny_model), "gradient_checkpointing": True},
        finetune={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.5},
    )
    model = load_model(JobSpec.model_validate(job), "fp32", torch.device("cpu"))
    assert all(m.training for m in model.modules())
    with torch.no_grad():  # LoRA's B starts at zero, which would hide its dropout
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.arange(1, 17)[None]
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits), "dropout did not run"


def test_plan_shows_the_batch_arithmetic_and_state_bytes(tiny_model, tmp_path):
    job_file = write_job(tmp_path / "job.yaml", base_job(tiny_model, ALPACA, **two_ranks("zero3")))
    result = sharpen("plan", str(job_file), "--json")
    assert_ok(result)
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 2 and plan["strategy"] == "zero3"
    assert (plan["micro_batch_size"], plan["grad_accum"], plan["global_batch_size"]) == (2, 2, 8)
    # ZeRO-3 on 2 ranks, fp32: half of each tensor (rounded up), and the tensors of at most 10 x hidden
    # elements (the norms) also whole on every rank, as the chosen candidate's footprint counts them
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    whole = 10 * model.config.hidden_size
    zero3 = sum(4 * math.ceil(n / 2) + (4 * n if n <= whole else 0) for n in map(torch.numel, model.parameters()))
    assert plan["state_bytes_per_rank"]["params"] == plan["chosen"]["bytes_per_rank"]["params"] == zero3
    table = sharpen("plan", str(job_file))
    assert_ok(table)
    assert "micro 2 × accumulation 2 × ranks 2 = global 8" in table.stdout


def test_cuda_requested_without_gpu_is_refused(tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job_file = write_job(tmp_path / "job.yaml", {**base_job(tiny_model, ALPACA), "device": "cuda"})
    result = sharpen("run", str(job_file), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "device: cuda" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
