"""`sharpen eval` in-process: a local lm-eval task (tests/fixtures/eval_task, a YAML over a JSONL file, no
network) on the tiny model, its accuracy as a table row and in the JSON file, and as scored by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.cli import main
from launcher.errors import UserError

TASK_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "eval_task"


def hand_accuracy(model_dir: Path) -> float:
    """The task scored without lm-eval: the choice of highest log-likelihood after the prompt, per row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = rows = 0
    for line in (TASK_DIR / "opposites.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = f"### Instruction:\n{doc['instruction']}\n\n### Input:\n{doc['input']}\n\n### Response:\n"
        scores = []
        for choice in doc["choices"]:
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        rows += 1
    return right / rows


def test_a_local_task_prints_its_row_and_writes_the_number_lm_eval_computed(tiny_model, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", str(tiny_model), "--tasks", "tiny_opposites", "--include-path", str(TASK_DIR),
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    acc = json.loads(out.read_text())["results"]["tiny_opposites"]["acc,none"]
    assert acc == pytest.approx(hand_accuracy(tiny_model))
    header, row = captured.out.splitlines()[:2]
    assert header.split() == ["task", "metric", "value", "stderr"]
    assert row.split()[:3] == ["tiny_opposites", "acc", f"{acc:.4f}"]
    assert f"results in {out}" in captured.err


def test_an_unknown_task_is_refused_with_the_close_names():
    from launcher.commands.evaluate import task_manager

    with pytest.raises(UserError, match="unknown task 'tiny_oposites' .*; close names: tiny_opposites"):
        task_manager(["tiny_oposites"], str(TASK_DIR), include_defaults=False)
    with pytest.raises(UserError, match="--include-path /nowhere: no such directory"):
        task_manager(["tiny_opposites"], "/nowhere")
