"""DPO in one process: preference pairs in one padding-free row, the loss against its formula, the
plans of the realistic examples, and bad data refused before a rank starts."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from support import preference_jobs
from support.e2e import EXAMPLES, sharpen, write_job
from support.preference_jobs import PREFS, alone, dpo_job

from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.packing import IGNORE_INDEX, collate
from training.methods.dpo import DPOLoss
from training.methods.dpo_reference import AdapterDisabledReference

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache


ALPACA = EXAMPLES / "data" / "alpaca_tiny.jsonl"


def prepared(model_dir: Path, cache: Path, path: Path = PREFS, **data):
    spec = DataSpec(train=[{"path": str(path), "format": "preference"}], max_length=96, **data)
    return D.prepare_dataset(spec, "dpo", str(model_dir), cache_root=cache)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- data


def test_a_pair_is_one_row_of_chosen_then_rejected_with_the_prompt_masked(tiny_model, cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ds = C.load_prepared(prepared(tiny_model, cache))
    record = json.loads(PREFS.read_text().splitlines()[0])
    row = ds[0]
    n_chosen, n_rejected = row["segment_lengths"]
    assert (row["num_segments"], row["length"]) == (2, n_chosen + n_rejected)
    for segment, name in ((slice(0, n_chosen), "chosen"), (slice(n_chosen, None), "rejected")):
        ids, labels = row["input_ids"][segment], row["labels"][segment]
        assert tokenizer.decode(ids, skip_special_tokens=True) == record["prompt"] + record[name]
        assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == record[name] + "</s>"
        assert labels[-1] == IGNORE_INDEX  # nothing is predicted across the boundary

    batch = collate([ds[0], ds[1]])
    assert batch.input_ids.shape[0] == 1 and batch.num_samples == 4
    starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist()
    assert starts == [0, n_chosen, row["length"], row["length"] + ds[1]["segment_lengths"][0]]


def test_chat_preference_pairs_use_the_chat_template(tiny_model, cache, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Give the opposite.\nhot"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "chosen": "cold", "rejected": "hot"}] * 2)
    row = C.load_prepared(prepared(tiny_model, cache, path))[0]
    n_chosen = row["segment_lengths"][0]
    text = tokenizer.decode(row["input_ids"][:n_chosen])
    assert text.startswith("<s><|system|>\nBe brief.<|end|>\n<|user|>\n") and text.endswith(
        "<|assistant|>\ncold<|end|>\n</s>"
    )
    labels = [t for t in row["labels"][:n_chosen] if t != IGNORE_INDEX]
    assert tokenizer.decode(labels) == "cold<|end|>\n</s>"
    # UltraFeedback's shape: a string prompt, and answers that repeat it as their first turn.
    question = "Give the opposite.\nhot"
    answers = {
        k: [{"role": "user", "content": question}, {"role": "assistant", "content": v}]
        for k, v in (("chosen", "cold"), ("rejected", "hot"))
    }
    plain = {"prompt": [{"role": "user", "content": question}], "chosen": "cold", "rejected": "hot"}
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", [{"prompt": question, **answers}] * 2)
    again = write_jsonl(tmp_path / "plain.jsonl", [plain] * 2)
    assert (
        C.load_prepared(prepared(tiny_model, cache, path))[0]
        == C.load_prepared(prepared(tiny_model, cache, again))[0]
    )


def test_eval_split_is_held_out_deterministically(tiny_model, cache):
    first = prepared(tiny_model, cache, eval_split=0.1)
    train, held = C.load_prepared(first), C.load_prepared_eval(first)
    everything = C.load_prepared(prepared(tiny_model, cache))
    assert len(held) == round(0.1 * len(everything))
    rows = Counter(map(tuple, everything["input_ids"]))
    assert Counter(map(tuple, train["input_ids"])) + Counter(map(tuple, held["input_ids"])) == rows
    again = prepared(tiny_model, cache / "again", eval_split=0.1)
    assert C.load_prepared_eval(again)["input_ids"] == held["input_ids"]
    assert C.load_prepared_eval(prepared(tiny_model, cache)) is None


# ---------------------------------------------------------------- the loss


def formula(chosen, rejected, ref_chosen, ref_rejected, beta, loss, smoothing) -> float:
    """One pair's DPO loss written out from the papers (DPO, cDPO, IPO, SLiC hinge) in plain floats."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        return -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)




@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_of_a_fixed_batch_equals_the_formula(tiny_model, cache, loss, smoothing):
    """Three pairs in one packed row, LoRA with a random (non-zero) adapter against the base model loaded
    separately, each sequence run alone: the loss and reward sums agree to 1e-6."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64), config)
    ds = C.load_prepared(prepared(tiny_model, cache))
    rows = [ds[i] for i in (0, 5, 9)]
    beta = 0.5
    out = DPOLoss(AdapterDisabledReference(policy), beta, loss, smoothing)(policy, collate(rows))

    want_loss = want_chosen = want_accuracy = 0.0
    for row in rows:
        cut = row["segment_lengths"][0]
        seqs = [(row["input_ids"][:cut], row["labels"][:cut]), (row["input_ids"][cut:], row["labels"][cut:])]
        (pc, nc), (pr, nr) = (alone(policy, *s) for s in seqs)
        (rc, _), (rr, _) = (alone(base, *s) for s in seqs)
        if loss == "ipo":
            pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
        want_loss += formula(pc, pr, rc, rr, beta, loss, smoothing)
        want_chosen += beta * (pc - rc)
        want_accuracy += beta * (pc - rc) > beta * (pr - rr)
    assert math.isclose(out.loss_sum.item(), want_loss, rel_tol=1e-6), (out.loss_sum.item(), want_loss)
    assert math.isclose(out.metric_sums["rewards/chosen"].item(), want_chosen, rel_tol=1e-6, abs_tol=1e-9)
    assert out.metric_sums["rewards/accuracy"].item() == want_accuracy
    assert out.loss_sum.requires_grad


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "name,source", [("dpo-llama3-8b-8gpu", "adapter_disabled"), ("dpo-llama3-8b-slurm", "precomputed")]
)
def test_realistic_examples_plan(name, source, tmp_path):
    """What `sharpen plan` prints, from the plan it builds (in this process: a CLI start costs seconds)."""
    from launcher.jobfile import load_job
    from launcher.planner import build_plan

    plan, _ = build_plan(load_job(EXAMPLES / f"{name}.yaml"), tmp_path)
    assert plan.reference["source"] == source and plan.reference["memory_bytes_per_rank"] == 0
    assert plan.params["total"] > 8e9 and plan.device == "cuda"


# ---------------------------------------------------------------- bad input


def test_preference_file_without_rejected_is_one_clear_error(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "2+2? ", "chosen": "4"}] * 4)
    job = dpo_job(tiny_model, tmp_path / "cache", "lora", "single", 1)
    job["data"]["train"] = [{"path": str(path), "format": "preference"}]
    result = sharpen("run", str(write_job(tmp_path / "job.yaml", job)), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "'rejected'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "logs").exists(), "no rank may start on bad data"


def test_dpo_on_alpaca_data_is_one_clear_error(tiny_model, tmp_path):
    job = dpo_job(tiny_model, tmp_path / "cache", "lora", "single", 1)
    job["data"]["train"] = [{"path": str(ALPACA), "format": "alpaca"}]
    job_file = write_job(tmp_path / "job.yaml", job)
    result = sharpen("run", str(job_file), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert str(job_file) in result.stderr and "Traceback" not in result.stderr
    assert (
        "data.train.0.format: 'alpaca' does not fit method.kind 'dpo', which reads format preference"
        in result.stderr
    )
