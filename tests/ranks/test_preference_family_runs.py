"""ORPO, SimPO and DPO + sft_weight (RPO) end to end on the synthetic preference set (chosen right, rejected
hedged and wrong): on one rank the held-out pairs' log-probability margin rises; 2 ranks of ddp, fsdp
and zero3 reproduce the single-rank losses, and a zero2 run killed and resumed does too; QLoRA trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support import preference_jobs
from support.e2e import assert_ok, assert_same, eval_rows, run_job, sharpen, train_rows
from support.preference_jobs import dpo_job

from training.env_hooks import FAULT

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache

METHODS = {
    "orpo": {"kind": "orpo", "beta": 0.5},
    "simpo": {"kind": "simpo", "beta": 2.0, "gamma": 0.5},
    "rpo": {"kind": "dpo", "beta": 0.5, "sft_weight": 1.0},
}
# The single-rank runs every other run is compared with: (method, finetune).
# ORPO's NLL term dominates on this tiny model: its LoRA adapter barely moves the margin in 6 steps, so
# ORPO's baseline is full fine-tuning.
BASELINES = [("orpo", "full"), ("simpo", "lora"), ("rpo", "lora")]


def job(model: Path, cache: Path, method: str, finetune: str, strategy: str = "single", ranks: int = 1) -> dict:
    """DPO's test job (6 steps of 4 micro-batches of 2 pairs, evaluations at 3 and 6) with `method`."""
    spec = dpo_job(model, cache, finetune, strategy, ranks)
    spec["method"] = dict(METHODS[method])
    return spec










@pytest.fixture(scope="module")
def single_runs(tiny_model, cache, tmp_path_factory) -> dict[tuple[str, str], Path]:
    tmp = tmp_path_factory.mktemp("single")
    return {
        (method, ft): run_job(tmp, f"{method}-{ft}", job(tiny_model, cache, method, ft))[0]
        for method, ft in BASELINES
    }


def initial_margin(run_dir: Path, model_dir: Path, method: str) -> float:
    """eval/rewards/margin of the initial model (before step 1), computed here: for ORPO and SimPO beta x
    the mean per-token log-probability of chosen minus rejected over the held-out pairs; for RPO 0, the
    policy being its reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.data.cache import load_prepared_eval
    from training.data.packing import collate
    from training.methods.dpo import sequence_logps

    if method == "rpo":
        return 0.0
    held_out = load_prepared_eval(Path(json.loads((run_dir / "plan.json").read_text())["data_cache"]))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gaps = []
    with torch.no_grad():
        for row in held_out:
            logps, tokens = sequence_logps(model, collate([row]), slice_logits=False)
            average = logps / tokens
            gaps.append(float(average[0] - average[1]))
    return METHODS[method]["beta"] * sum(gaps) / len(gaps)


# The loss terms each method logs besides loss and rewards/.
TERMS = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "simpo": ("margin_minus_gamma",), "rpo": ("nll_loss",)}


@pytest.mark.parametrize("method,finetune", BASELINES)
def test_the_held_out_log_probability_margin_rises(single_runs, tiny_model, method, finetune):
    """The reward-free number: on held-out pairs, chosen's log-probability minus rejected's grows. For ORPO
    and SimPO eval rewards/margin is beta x that margin per token; for RPO it is beta x the margin's growth
    over the (fixed) reference, so its rise is the policy's margin rising too."""
    run_dir = single_runs[(method, finetune)]
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", *TERMS[method]):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    evals = eval_rows(run_dir)
    assert [r["step"] for r in evals] == [3, 6]
    margins = [initial_margin(run_dir, tiny_model, method), *(r["eval/rewards/margin"] for r in evals)]
    assert margins[2] > margins[1] > margins[0], margins
    assert evals[1]["eval/rewards/accuracy"] >= 0.75
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    if method != "rpo":  # the policy's own per-token margin, as logged
        gap = [r["eval/logps/chosen"] - r["eval/logps/rejected"] for r in evals]
        assert gap[1] > gap[0] and math.isclose(margins[2], METHODS[method]["beta"] * gap[1], rel_tol=1e-6)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["reference"] is None) == (method != "rpo")
    assert not (run_dir / "reference").exists()  # nothing precomputed: none (orpo, simpo), adapter off (rpo)


@pytest.mark.parametrize(
    "method,finetune,strategy",
    [("simpo", "lora", "ddp"), ("orpo", "full", "fsdp"), ("rpo", "lora", "zero3")],
)
def test_two_ranks_reproduce_the_single_rank_run(tiny_model, cache, single_runs, tmp_path, method, finetune, strategy):
    """Losses, every metric and the sharded evaluation, step for step, against one rank. zero2 is the
    resume test below (its resumed run must reproduce the single-rank run too)."""
    run_dir, _ = run_job(tmp_path, strategy, job(tiny_model, cache, method, finetune, strategy, 2))
    want, got = train_rows(single_runs[(method, finetune)]), train_rows(run_dir)
    for key in ("loss", "rewards/margin", "rewards/chosen", *TERMS[method]):
        assert_same([r[key] for r in got], [r[key] for r in want], key, rel=1e-4 if key == "loss" else 1e-3)
    # RPO from step 2: at step 1 its policy is its reference, every margin 0 up to rounding and its sign noise.
    first = 1 if method == "rpo" else 0
    assert [r["rewards/accuracy"] for r in got[first:]] == [r["rewards/accuracy"] for r in want[first:]]
    for key in ("eval/loss", "eval/rewards/margin"):
        assert_same([r[key] for r in eval_rows(run_dir)], [r[key] for r in eval_rows(single_runs[(method, finetune)])], key)


def test_qlora_simpo_trains(tiny_model, cache, tmp_path):
    """A 4-bit base under a LoRA adapter: the loss falls and the held-out margin rises, as in 16 bits."""
    run_dir, _ = run_job(tmp_path, "qlora", job(tiny_model, cache, "simpo", "qlora"))
    rows, evals = train_rows(run_dir), eval_rows(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert evals[1]["eval/rewards/margin"] > evals[0]["eval/rewards/margin"] > 0


def test_a_killed_orpo_run_resumes_to_the_same_losses(tiny_model, cache, single_runs, tmp_path):
    """kill -9 after step 3 (checkpoint at 2) under zero2; the resumed run ends with the uninterrupted
    single-rank run's losses and evaluation."""
    spec = job(tiny_model, cache, "orpo", "full", "zero2", 2)
    run_dir, result = run_job(tmp_path, "crashed", spec, env={FAULT: "kill-after-step:3"}, ok=False)
    assert result.returncode == 1 and [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    assert_ok(sharpen("resume", str(run_dir)))
    want = single_runs[("orpo", "full")]
    for key in ("loss", "log_odds_ratio"):
        assert_same([r[key] for r in train_rows(run_dir)], [r[key] for r in train_rows(want)], f"resumed {key}")
    assert_same([r["eval/loss"] for r in eval_rows(run_dir)], [r["eval/loss"] for r in eval_rows(want)], "eval")
