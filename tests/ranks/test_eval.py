"""Evaluation during training: SFT eval loss and perplexity over data.eval files, sharded over ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from support.e2e import ALPACA, assert_ok, base_job, metrics, sharpen, write_job
from support.report_samples import report_samples

from training.data.cache import load_prepared_eval
from training.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT


def test_sft_eval_loss_and_perplexity_are_logged_and_exact(tiny_model, tmp_path):
    """2 ranks, 21 eval samples in chunks of 2 ranks x micro batch 2: the last chunk leaves rank 1 without
    rows. The logged eval loss at the last step equals the trained model's mean cross-entropy over every
    eval label token, each sample run alone; perplexity is its exponential. report.md shows the first 3 eval
    prompts completed before and after training, with each record's output as the reference."""
    from transformers import AutoModelForCausalLM

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(ALPACA.read_text().splitlines(keepends=True)[-21:]))
    job = base_job(
        tiny_model,
        ALPACA,
        data={"eval": [{"path": str(eval_file), "format": "alpaca"}], "cache_dir": str(tmp_path / "cache")},
        train={"max_steps": 4, "eval_every": 2},
        strategy={"name": "ddp"},
        resources={"gpus_per_node": 2},
    )
    run_dir = tmp_path / "run"
    assert_ok(sharpen("run", str(write_job(tmp_path / "job.yaml", job)), "--output-dir", str(run_dir)))
    rows = metrics(run_dir)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4] and set(evals[0]) == {"step", "eval/loss", "eval/perplexity"}
    for r in evals:
        assert math.isclose(r["eval/perplexity"], math.exp(r["eval/loss"]), rel_tol=1e-12)
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    dataset = load_prepared_eval(Path(json.loads((run_dir / "plan.json").read_text())["data_cache"]))
    assert len(dataset) == 21
    total, count = 0.0, 0
    for row in dataset:
        labels = torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert math.isclose(evals[1]["eval/loss"], total / count, rel_tol=1e-5), (
        evals[1]["eval/loss"],
        total / count,
    )

    records = [json.loads(line) for line in eval_file.read_text().splitlines()[:3]]
    samples = report_samples(run_dir)
    prompts = [(ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT).format(**r) for r in records]
    assert [s["Prompt"] for s in samples] == prompts
    assert [s["Reference answer in the data"] for s in samples] == [r["output"] for r in records]
    assert all(s["Before training"] != s["After step 4"] for s in samples), samples
