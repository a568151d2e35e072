"""Reward models: a scalar head trained with the Bradley–Terry loss, resumable, exported for transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support import preference_jobs
from support.e2e import assert_ok, metrics, sharpen, write_job
from support.preference_jobs import STEPS, reward_job

from training.data.cache import load_prepared_eval
from training.env_hooks import FAULT

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model


def split_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = metrics(run_dir)
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    job = write_job(tmp / "job.yaml", reward_job(tiny_model, tmp / "cache"))
    assert_ok(sharpen("run", str(job), "--output-dir", str(tmp / "run")))
    return tmp / "run"


def test_accuracy_and_margin_rise_on_a_separable_set(straight):
    train, evals = split_rows(straight)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [3, STEPS]
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["margin"] > train[0]["margin"] + 0.5, train
    assert all(r["accuracy"] > 0.8 for r in train[-3:]), train
    assert evals[-1]["eval/accuracy"] > 0.9 and evals[-1]["eval/margin"] > evals[0]["eval/margin"], evals


def test_final_is_a_sequence_classifier_that_scores_as_trained(straight):
    """final/ loads with AutoModelForSequenceClassification; scoring each eval sequence alone (transformers'
    own pooling) gives the accuracy and margin the run logged for the packed, sharded evaluation."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(straight / "final").eval()
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    plan = json.loads((straight / "plan.json").read_text())
    wins, margins = 0, []
    for row in load_prepared_eval(Path(plan["data_cache"])):
        cut = row["segment_lengths"][0]
        with torch.no_grad():
            chosen, rejected = (
                model(input_ids=torch.tensor([ids])).logits.item()
                for ids in (row["input_ids"][:cut], row["input_ids"][cut:])
            )
        wins += chosen > rejected
        margins.append(chosen - rejected)
    logged = split_rows(straight)[1][-1]
    assert wins / len(margins) == logged["eval/accuracy"]
    assert math.isclose(sum(margins) / len(margins), logged["eval/margin"], rel_tol=1e-4)


def test_fsdp_reward_model_resumes_after_a_kill(tiny_model, straight, tmp_path):
    """2 ranks under FSDP, kill -9 after step 3, `sharpen resume`: the losses and the evaluation of the
    uninterrupted single-rank run, step for step."""
    job = write_job(tmp_path / "job.yaml", reward_job(tiny_model, tmp_path / "cache", "full", "fsdp", 2))
    run_dir = tmp_path / "run"
    result = sharpen(
        "run", str(job), "--output-dir", str(run_dir), env={FAULT: "kill-after-step:3"}
    )
    assert result.returncode == 1 and [r["step"] for r in split_rows(run_dir)[0]] == [1, 2, 3]
    assert_ok(sharpen("resume", str(run_dir)))
    (got, got_eval), (want, want_eval) = split_rows(run_dir), split_rows(straight)
    assert len(got) == len(want) == STEPS and len(got_eval) == len(want_eval)
    for key, a, b in [("loss", got, want), ("accuracy", got, want), ("eval/loss", got_eval, want_eval)]:
        for step, (g, w) in enumerate(zip(a, b, strict=True), start=1):
            assert math.isclose(g[key], w[key], rel_tol=1e-4), f"{key} at row {step}: {g[key]} vs {w[key]}"
