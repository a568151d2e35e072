"""KTO end to end: the held-out margin rises on one rank, 2 ranks of ddp and fsdp reproduce its
losses and z0 (with other accumulation), QLoRA trains, a killed ZeRO-3 run resumes with its precomputed
reference and KL sums."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support import preference_jobs
from support.e2e import assert_ok, assert_same, eval_rows, run_job, sharpen, train_rows
from support.feedback_jobs import kto_job, write_feedback
from support.feedback_margin import held_out_margin
from support.report_samples import report_samples

from training.env_hooks import FAULT

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache

WEIGHTS = {"desirable_weight": 1.5, "undesirable_weight": 1.0}
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "loss/undesirable")


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> Path:
    return write_feedback(tmp_path_factory.mktemp("feedback") / "feedback.jsonl")


def job(tiny_model, cache, feedback, finetune: str, strategy: str, ranks: int) -> dict:
    return kto_job(tiny_model, cache, feedback, finetune, strategy, ranks, **WEIGHTS)










def assert_reproduces(run_dir: Path, want_dir: Path) -> None:
    want, got = train_rows(want_dir), train_rows(run_dir)
    for key in KEYS:
        assert_same([r[key] for r in got], [r[key] for r in want], key, rel=1e-4 if key == "loss" else 1e-3)
    for key in ("eval/loss", "eval/kl"):
        assert_same([r[key] for r in eval_rows(run_dir)], [r[key] for r in eval_rows(want_dir)], key)


@pytest.fixture(scope="module")
def single_runs(tiny_model, cache, feedback, tmp_path_factory) -> dict[str, Path]:
    """One rank, micro batch 2 × accumulation 4: what every strategy must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    return {ft: run_job(tmp, ft, job(tiny_model, cache, feedback, ft, "single", 1))[0] for ft in ("lora", "full")}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_kto_trains_and_is_evaluated(single_runs, finetune):
    rows = train_rows(single_runs[finetune])
    assert [r["step"] for r in rows] == list(range(1, 7))
    # Step 1: the policy is the reference, so every log-ratio and z0 is 0 and each completion's loss is
    # 1 − σ(0) = 1/2 of its weight (1.5 desirable, 1 undesirable): the shares of the two labels sum to 1.
    first = rows[0]
    assert abs(first["kl"]) < 1e-6 and abs(first["rewards/margin"]) < 1e-5
    shares = first["loss/desirable"] / 0.75, first["loss/undesirable"] / 0.5
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-5) and min(shares) > 0.2, first
    assert math.isclose(first["loss"], first["loss/desirable"] + first["loss/undesirable"], rel_tol=1e-5)
    evals = eval_rows(single_runs[finetune])
    # z0 is estimated, not stuck at the clamp: the runs that reproduce this one compare it
    assert max(r["kl"] for r in rows[1:]) > 0.01 and max(r["eval/kl"] for r in evals) > 0.01, (rows, evals)
    assert rows[-1]["loss"] < first["loss"] and max(r["rewards/margin"] for r in rows[1:]) > 0.1, rows
    evals = eval_rows(single_runs[finetune])
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["eval/rewards/margin"] > evals[0]["eval/rewards/margin"] > 0.05, evals
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    plan = json.loads((single_runs[finetune] / "plan.json").read_text())
    assert plan["reference"]["source"] == ("adapter_disabled" if finetune == "lora" else "precomputed")
    # report.md: held-out prompts completed before and after training, each beside its judged completion
    samples = report_samples(single_runs[finetune])
    assert len(samples) == 3 and all({"Prompt", "Before training", "After step 6"} <= set(s) for s in samples), samples
    judged = [t for s in samples for t in s if t.startswith("Completion (")]
    assert len(judged) == 3 and set(judged) <= {"Completion (desirable) in the data", "Completion (undesirable) in the data"}
    assert (single_runs[finetune] / "reference" / "logps.pt").is_file() == (finetune == "full")


def test_held_out_log_probability_margin_rises(tiny_model, single_runs):
    """Reward-free: on preference pairs never trained on, log p(chosen) − log p(rejected) of the trained
    policy rises above the initial model's."""
    before = held_out_margin(tiny_model, tiny_model)
    after = held_out_margin(single_runs["full"] / "final", tiny_model)
    assert after > before + 0.5, (before, after)


@pytest.mark.parametrize("finetune,strategy", [("lora", "ddp"), ("full", "fsdp")])
def test_two_ranks_reproduce_single_rank_kto(tiny_model, cache, feedback, single_runs, tmp_path, finetune, strategy):
    """Losses, z0, rewards and the (sharded) evaluation step for step, with accumulation 2 instead of 4.
    Full fine-tuning under zero3 is the resume test below."""
    run_dir, _ = run_job(tmp_path, strategy, job(tiny_model, cache, feedback, finetune, strategy, 2))
    assert_reproduces(run_dir, single_runs[finetune])


def test_qlora_kto_trains(tiny_model, cache, feedback, tmp_path):
    run_dir, _ = run_job(tmp_path, "qlora", job(tiny_model, cache, feedback, "qlora", "single", 1))
    rows = train_rows(run_dir)
    assert len(rows) == 6 and abs(rows[0]["kl"]) < 1e-6 and rows[-1]["loss"] < rows[0]["loss"], rows
    assert eval_rows(run_dir)[-1]["eval/rewards/margin"] > 0.05


def test_zero3_full_kto_resumes_after_a_kill_with_its_precomputed_reference(
    tiny_model, cache, feedback, single_runs, tmp_path
):
    """kill -9 after step 3 (checkpoint at 2); the resumed run reads RUN/reference/ back (the rows' and every
    step's KL pairs' reference log-probabilities) and ends with the uninterrupted single-rank run's numbers."""
    spec = job(tiny_model, cache, feedback, "full", "zero3", 2)
    run_dir, result = run_job(tmp_path, "crashed", spec, env={FAULT: "kill-after-step:3"}, ok=False)
    assert result.returncode == 1 and [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    reference = (run_dir / "reference" / "logps.pt").stat().st_mtime_ns
    assert_ok(sharpen("resume", str(run_dir)))
    assert (run_dir / "reference" / "logps.pt").stat().st_mtime_ns == reference
    assert "reference log-probabilities read from" in (run_dir / "logs" / "rank-0.log").read_text()
    assert_reproduces(run_dir, single_runs["full"])
