"""Reward models: a scalar head trained with the Bradley–Terry loss, resumable, exported for transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from e2e import EXAMPLES, assert_ok, base_job, metrics, sharpen, write_job

from launcher.spec import JobSpec
from training.data.cache import load_prepared_eval
from training.data.formats import ALPACA_PROMPT_WITH_INPUT
from training.data.packing import collate
from training.env_hooks import FAULT
from training.methods.reward import RewardLoss

# Separable: every rejected answer is hedged ("Maybe ..."), and wrong (examples/make_dataset.py).
PREFS = EXAMPLES / "data" / "preference_tiny.jsonl"
STEPS = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, [ALPACA_PROMPT_WITH_INPUT] * 20 + corpus_from_jsonl(PREFS), vocab_size=512)
    return out


def reward_job(
    model: Path, cache: Path, finetune: str = "full", strategy: str = "single", ranks: int = 1
) -> dict:
    return base_job(
        model,
        PREFS,
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={"kind": "reward"},
        data={
            "train": [{"path": str(PREFS), "format": "preference"}],
            "max_length": 96,
            "eval_split": 0.05,
            "cache_dir": str(cache),
        },
        train={"max_steps": STEPS, "lr": 2.0e-3, "save_every": 2, "eval_every": 3},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )


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


def test_lora_reward_model_exports_an_adapter_with_its_head(tiny_model, tmp_path):
    """LoRA: final/ is a PEFT adapter (task SEQ_CLS) carrying the trained score head; loaded over the base
    with transformers and PEFT, it scores each sequence alone as the training model scored it packed."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from launcher.spec import DataSpec
    from strategies.base import DistEnv, StrategyOptions
    from strategies.single import SingleStrategy
    from training.data.cache import load_prepared
    from training.data.prepare import prepare_dataset
    from training.export import write_final
    from training.model import load_model, load_tokenizer

    spec = JobSpec.model_validate(reward_job(tiny_model, tmp_path / "cache", finetune="lora"))
    model = load_model(spec, "fp32", torch.device("cpu"))
    torch.manual_seed(1)
    for param in (p for p in model.parameters() if p.requires_grad):  # as if trained: adapter and head move
        param.data += 0.05 * torch.randn_like(param)
    strategy = SingleStrategy(StrategyOptions(), DistEnv())
    strategy.setup(
        model,
        lambda params: torch.optim.AdamW(params),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    )
    write_final(strategy, load_tokenizer(spec), tmp_path / "final", peft=True)
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    data = DataSpec(train=[{"path": str(PREFS), "format": "preference"}], max_length=96)
    rows = [
        load_prepared(prepare_dataset(data, "reward", str(tiny_model), cache_root=tmp_path / "cache"))[i]
        for i in range(3)
    ]
    with torch.no_grad():
        packed, _ = RewardLoss().rewards(model.eval(), collate(rows))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    loaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    alone = []
    for row in rows:
        cut = row["segment_lengths"][0]
        for ids in (row["input_ids"][:cut], row["input_ids"][cut:]):
            with torch.no_grad():
                alone.append(loaded(input_ids=torch.tensor([ids])).logits.item())
    torch.testing.assert_close(packed, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert packed[0::2].sub(packed[1::2]).abs().max() > 1e-3, "rewards do not depend on the answer"
