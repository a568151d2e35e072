"""GRPO end to end on real ranks: the reward rises on a toy task, every strategy reproduces one rank's
losses step for step (reference and clipping included), a killed run resumes on another world size with
the same losses, a reward model trained by sharpen scores the rollouts, and a reward that goes wrong
mid-run stops it with one message."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from support import grpo_jobs, preference_jobs
from support.e2e import assert_ok, run_job, sharpen, train_rows
from support.grpo_jobs import REWARDS, grpo_job

from training.env_hooks import FAULT

grpo_inputs = grpo_jobs.grpo_inputs
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache

# What the strategies must agree on: beta > 0 (the reference: a frozen copy for full fine-tuning, the
# adapter disabled for LoRA) and two updates per generation batch (the clipped ratio against old log-probs).
EXACT = {"beta": 0.1, "num_iterations": 2}
COMPARED = ("loss", "reward", "kl", "clip_ratio/region", "entropy", "completions/mean_length")






def assert_same_rows(got: list[dict], want: list[dict], what: str, rel: float = 1e-4) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], (got, want)
    for g, w in zip(got, want, strict=True):
        for key in COMPARED:
            assert math.isclose(g[key], w[key], rel_tol=rel, abs_tol=1e-6), f"{what} step {g['step']} {key}: {g[key]} vs {w[key]}"


@pytest.fixture(scope="module")
def single_runs(grpo_inputs, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("grpo-single")
    return {ft: run_job(tmp, ft, grpo_job(grpo_inputs, ft, **EXACT))[0] for ft in ("full", "lora")}


def test_reward_rises_on_a_toy_task_and_every_figure_is_logged(grpo_inputs, tmp_path):
    """40 steps of full fine-tuning on one rank: a random tiny model learns to write letters."""
    job = grpo_job(grpo_inputs, steps=40, rewards=[{"function": f"{REWARDS}:letters"},
                                                   {"function": f"{REWARDS}:length", "weight": 0.0}])
    job["logging"]["wandb"] = {"project": "sharpen-tests", "mode": "offline"}
    run_dir, _ = run_job(tmp_path, "toy", job)
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = (statistics.mean(r["reward"] for r in part) for part in (rows[:8], rows[-8:]))
    assert first < 0.2 and last > first + 0.15, (first, last)
    assert rows[-1]["entropy"] < rows[0]["entropy"] - 0.2
    for key in ("reward_std", "rewards/letters/mean", "rewards/length/mean", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "frac_reward_zero_std", "clip_ratio/low",
                "time/generate_s", "time/score_s", "time/update_s", "tokens/generated_per_s"):
        assert key in rows[0], key
    assert "kl" not in rows[0]  # beta 0: no reference is held
    # rewards/letters equals the weighted total (the length reward has weight 0), and lengths are at most 16.
    assert all(math.isclose(r["reward"], r["rewards/letters/mean"], rel_tol=1e-6) for r in rows)
    assert all(1 <= r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 16 for r in rows)

    # RUN/completions.jsonl: every completion of each step (16 < 64), its reward recomputed from its text,
    # and group-normalised advantages: each group of 4 sums to 0.
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 40 * 16 and [row["step"] for row in logged[::16]] == list(range(1, 41))
    letters = set("abcdefghijklmnopqrstuvwxyz ")
    for row in logged[:64]:
        text = row["completion"]
        assert math.isclose(row["rewards"]["letters"], sum(ch in letters for ch in text) / max(1, len(text)), abs_tol=1e-6)
    for start in range(0, 64, 4):
        group = logged[start : start + 4]
        assert len({row["prompt"] for row in group}) == 1
        assert abs(sum(row["advantage"] for row in group)) < 1e-4
    tables = sorted((run_dir / "wandb").glob("offline-run-*/files/media/table/completions_*.table.json"))
    assert len(tables) == 40, tables  # a W&B table of each logged step's completions
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "prompt", "completion"] and len(table["data"]) == 16
    report = (run_dir / "report.md").read_text()
    assert "| final_reward |" in report and (run_dir / "report.png").is_file()


@pytest.mark.parametrize(
    "finetune,strategy,gather",
    # zero2 places the frozen copy as single does (Strategy.frozen_copy's default); left out for suite time
    [("full", "ddp", "none"), ("full", "fsdp", "rollout"), ("full", "zero3", "rollout"), ("lora", "fsdp", "forward"),
     ("lora", "zero3", "forward")],
)
def test_two_ranks_reproduce_one_rank(grpo_inputs, single_runs, tmp_path, finetune, strategy, gather):
    """The same completions (seeded per prompt and generation, not per rank), rewards, KL and clipped
    losses, step for step, the reference sharded like the policy. FSDP2 and ZeRO-3 generate with the
    model gathered once per rollout (auto, where it fits) or per forward, the ranks decoding in lockstep."""
    asked = {"generation_gather": "forward"} if gather == "forward" else {}
    run_dir, _ = run_job(tmp_path, strategy, grpo_job(grpo_inputs, finetune, strategy, 2, **EXACT, **asked))
    assert json.loads((run_dir / "plan.json").read_text())["rollout"]["gather"] == gather
    rows, want = train_rows(run_dir), train_rows(single_runs[finetune])
    assert_same_rows(rows, want, f"{finetune} {strategy}")
    assert rows[0]["kl"] == 0.0 or abs(rows[0]["kl"]) < 1e-7  # step 1: the policy is the reference
    assert rows[1]["clip_ratio/region"] > 0 or rows[3]["clip_ratio/region"] > 0  # second update of a batch
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["reference"]["source"] == ("frozen_copy" if finetune == "full" else "adapter_disabled")


def test_kill_inside_a_generation_batch_and_resume_on_one_rank(grpo_inputs, single_runs, tmp_path):
    """kill -9 after step 3, whose checkpoint is inside the second generation batch (num_iterations 2):
    the batch is kept with it, and the run resumed on 1 rank ends with the uninterrupted losses."""
    job = grpo_job(grpo_inputs, "full", "fsdp", 2, train={"save_every": 1}, **EXACT)
    run_dir, result = run_job(tmp_path, "killed", job, env={FAULT: "kill-after-step:3"}, ok=False)
    assert result.returncode != 0
    saved = run_dir / "checkpoints" / "step-3"
    assert sorted(p.name for p in saved.glob("rollout-rank*.pt")) == ["rollout-rank0.pt", "rollout-rank1.pt"]
    resumed = sharpen("resume", str(run_dir), "--set", "resources.gpus_per_node=1", "--set", "strategy.name=single")
    assert_ok(resumed)
    assert_same_rows(train_rows(run_dir), train_rows(single_runs["full"]), "resumed")
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged[::16]] == [1, 3]  # one batch each; step 3's not written twice


def test_grpo_against_a_reward_model_trained_by_sharpen(tiny_model, cache, grpo_inputs, tmp_path):
    """Train a reward model (method reward), then score GRPO's rollouts with it: each logged reward is
    the model's logit of BOS + prompt + completion + EOS, as it was trained."""
    rm_dir, _ = run_job(tmp_path, "rm", preference_jobs.reward_job(tiny_model, cache))
    job = grpo_job(grpo_inputs, "lora", steps=2, rewards=[{"model": str(rm_dir / "final"), "weight": 2.0}])
    job["model"]["path"] = str(tiny_model)  # the policy: the reward model's base, its tokenizer
    run_dir, _ = run_job(tmp_path, "grpo-rm", job)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["rollout"]["reward_model_bytes"] > 0

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir / "final")
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    name = next(iter(logged[0]["rewards"]))
    for row in logged[:8]:
        ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        with torch.no_grad():
            score = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert math.isclose(row["rewards"][name], score, rel_tol=1e-4, abs_tol=1e-5), (row, score)
        assert math.isclose(row["reward"], 2.0 * score, rel_tol=1e-4, abs_tol=1e-5)
    scores = [row["reward"] for row in logged]
    assert statistics.pstdev(scores) > 0  # the model tells completions apart


def test_a_reward_that_goes_wrong_mid_run_stops_it_with_one_message(grpo_inputs, tmp_path):
    job = grpo_job(grpo_inputs, "lora", "ddp", 2, rewards=[{"function": f"{REWARDS}:one_short_at_step_2"}])
    run_dir, result = run_job(tmp_path, "bad-reward", job, ok=False)
    assert result.returncode == 1, result.stderr
    assert "reward 'one_short_at_step_2' at step 2: returned 7 rewards for 8 completions" in result.stderr, result.stderr
    assert [r["step"] for r in train_rows(run_dir)] == [1]


def test_qlora_generates_through_its_adapter_and_its_reference_is_the_adapter_disabled(grpo_inputs, tmp_path):
    run_dir, _ = run_job(tmp_path, "qlora", grpo_job(grpo_inputs, "qlora", steps=3, beta=0.1))
    rows = train_rows(run_dir)
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] > 0  # the adapter moves the policy off the base
    assert all(0 <= r["reward"] <= 1 and math.isfinite(r["loss"]) for r in rows)
    assert json.loads((run_dir / "plan.json").read_text())["reference"]["source"] == "adapter_disabled"
