"""DPO end to end: margins and accuracy rise on one rank, 2 ranks of every strategy reproduce it, a
killed ZeRO-3 run resumes with its precomputed reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support import preference_jobs
from support.e2e import assert_ok, assert_same, eval_rows, run_job, sharpen, train_rows
from support.preference_jobs import dpo_job
from support.report_samples import report_samples

from training.env_hooks import FAULT
from training.samples import shown

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache


# ---------------------------------------------------------------- end to end










@pytest.fixture(scope="module")
def single_runs(tiny_model, cache, tmp_path_factory) -> dict[str, Path]:
    """One rank, micro batch 2 × accumulation 4: what every strategy must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    return {ft: run_job(tmp, ft, dpo_job(tiny_model, cache, ft, "single", 1))[0] for ft in ("lora", "full")}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_margin_and_accuracy_rise_and_eval_is_logged(single_runs, finetune):
    rows = train_rows(single_runs[finetune])
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Step 1: the policy is the reference, so every reward is 0 (up to rounding) and the loss is log 2.
    assert math.isclose(rows[0]["loss"], math.log(2), rel_tol=1e-5) and abs(rows[0]["rewards/margin"]) < 1e-5
    assert rows[-1]["rewards/margin"] > rows[1]["rewards/margin"] > 0.1, rows
    assert all(r["rewards/accuracy"] > 0.8 for r in rows[-3:]), rows
    assert rows[-1]["loss"] < rows[1]["loss"] < math.log(2)
    evals = eval_rows(single_runs[finetune])
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["eval/rewards/margin"] > evals[0]["eval/rewards/margin"] > 0.1
    assert evals[1]["eval/rewards/accuracy"] > 0.8 and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    plan = json.loads((single_runs[finetune] / "plan.json").read_text())
    want = "adapter_disabled" if finetune == "lora" else "precomputed"
    assert plan["reference"]["source"] == want
    assert (single_runs[finetune] / "reference" / "logps.pt").is_file() == (finetune == "full")
    # report.md: the first 3 held-out prompts, completed before and after training, the chosen answer beside
    samples = report_samples(single_runs[finetune])
    chosen = {}
    for line in preference_jobs.PREFS.read_text().splitlines():
        record = json.loads(line)
        chosen.setdefault(record["prompt"], set()).add(record["chosen"])
    assert len(samples) == 3 and all(s["Chosen in the data"] in chosen[s["Prompt"]] for s in samples), samples
    assert any(s["Before training"] != s["After step 6"] for s in samples), samples


@pytest.mark.parametrize(
    "finetune,strategy", [("lora", "ddp"), ("lora", "fsdp"), ("lora", "zero3"), ("full", "fsdp")]
)
def test_two_ranks_reproduce_single_rank_dpo(tiny_model, cache, single_runs, tmp_path, finetune, strategy):
    """Losses, rewards and the (sharded) evaluation, step for step. Full fine-tuning under zero3 is the
    resume test below (its resumed run must reproduce the single-rank run too); under ddp its reference
    pass is the single strategy's forward, which lora-ddp covers with the harder per-step reference."""
    run_dir, _ = run_job(tmp_path, strategy, dpo_job(tiny_model, cache, finetune, strategy, 2))
    want, got = train_rows(single_runs[finetune]), train_rows(run_dir)
    for key in ("loss", "rewards/margin", "rewards/chosen"):
        assert_same([r[key] for r in got], [r[key] for r in want], key, rel=1e-4 if key == "loss" else 1e-3)
    # From step 2: at step 1 every margin is 0 up to rounding, and its sign is noise.
    assert [r["rewards/accuracy"] for r in got[1:]] == [r["rewards/accuracy"] for r in want[1:]]
    assert_same(
        [r["eval/loss"] for r in eval_rows(run_dir)],
        [r["eval/loss"] for r in eval_rows(single_runs[finetune])],
        "eval",
    )
    # the same prompts completed by the same initial model, decoded in lockstep where a forward is a collective
    samples, want = report_samples(run_dir), report_samples(single_runs[finetune])
    assert [(s["Prompt"], s["Before training"]) for s in samples] == [(s["Prompt"], s["Before training"]) for s in want]
    assert all("After step 6" in s for s in samples), samples


def test_zero3_full_dpo_resumes_after_a_kill_with_its_precomputed_reference(
    tiny_model, cache, single_runs, tmp_path
):
    """kill -9 after step 3 (checkpoint at 2); the resumed run reads RUN/reference/ back (the model is no
    longer the initial one) and ends with the uninterrupted single-rank run's losses."""
    job = dpo_job(tiny_model, cache, "full", "zero3", 2)
    run_dir, result = run_job(tmp_path, "crashed", job, env={FAULT: "kill-after-step:3"}, ok=False)
    assert result.returncode == 1 and [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    reference = (run_dir / "reference" / "logps.pt").stat().st_mtime_ns
    before = [s["before"] for s in json.loads((run_dir / "samples.json").read_text())["samples"]]
    assert_ok(sharpen("resume", str(run_dir)))
    assert (run_dir / "reference" / "logps.pt").stat().st_mtime_ns == reference
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "reference log-probabilities read from" in log
    # the initial model's completions, kept from the first start: the resumed run's report still has them
    assert f"samples: completions before training read from {run_dir / 'samples.json'}" in log
    samples = report_samples(run_dir)
    assert [s["Before training"] for s in samples] == [shown(b) for b in before]
    assert [s["Before training"] for s in samples] == [s["Before training"] for s in report_samples(single_runs["full"])]
    assert all("After step 6" in s for s in samples), samples
    want = [r["loss"] for r in train_rows(single_runs["full"])]
    assert_same([r["loss"] for r in train_rows(run_dir)], want, "resumed loss")
    assert_same(
        [r["eval/loss"] for r in eval_rows(run_dir)],
        [r["eval/loss"] for r in eval_rows(single_runs["full"])],
        "eval",
    )
