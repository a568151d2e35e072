"""DPO: preference pairs in one padding-free row, the loss against its formula, every strategy end to end."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from e2e import EXAMPLES, assert_ok, base_job, metrics, sharpen, write_job

from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.formats import ALPACA_PROMPT_WITH_INPUT
from training.data.packing import IGNORE_INDEX, collate
from training.env_hooks import FAULT
from training.methods.dpo import DPOLoss
from training.methods.dpo_reference import AdapterDisabledReference

PREFS = EXAMPLES / "data" / "preference_tiny.jsonl"
ALPACA = EXAMPLES / "data" / "alpaca_tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, [ALPACA_PROMPT_WITH_INPUT] * 20 + corpus_from_jsonl(PREFS), vocab_size=512)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


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


def alone(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """(sum of log p(label), label count) of one sequence run by itself, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logps = torch.log_softmax(logits, -1)
    picked = [logps[i, t].item() for i, t in enumerate(labels) if t != IGNORE_INDEX]
    return sum(picked), len(picked)


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


def dpo_job(model: Path, cache: Path, finetune: str, strategy: str, ranks: int) -> dict:
    return base_job(
        model,
        PREFS,
        finetune={"type": finetune, "r": 8, "alpha": 16},
        method={"kind": "dpo", "beta": 0.5},
        data={
            "train": [{"path": str(PREFS), "format": "preference"}],
            "max_length": 96,
            "eval_split": 0.05,
            "cache_dir": str(cache),
        },
        train={"max_steps": 6, "lr": 5.0e-3, "save_every": 2, "eval_every": 3},
        strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )


def run_job(tmp_path: Path, name: str, job: dict, env: dict | None = None, ok: bool = True):
    run_dir = tmp_path / name
    result = sharpen(
        "run", str(write_job(tmp_path / f"{name}.yaml", job)), "--output-dir", str(run_dir), env=env
    )
    if ok:
        assert_ok(result)
    return run_dir, result


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def eval_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "eval/loss" in r]


def assert_same(got: list[float], want: list[float], what: str, rel: float = 1e-4) -> None:
    assert len(got) == len(want) > 0, (got, want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(g, w, rel_tol=rel, abs_tol=1e-6), f"{what} {i}: {g} vs {w}"


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


def test_zero3_full_dpo_resumes_after_a_kill_with_its_precomputed_reference(
    tiny_model, cache, single_runs, tmp_path
):
    """kill -9 after step 3 (checkpoint at 2); the resumed run reads RUN/reference/ back (the model is no
    longer the initial one) and ends with the uninterrupted single-rank run's losses."""
    job = dpo_job(tiny_model, cache, "full", "zero3", 2)
    run_dir, result = run_job(tmp_path, "crashed", job, env={FAULT: "kill-after-step:3"}, ok=False)
    assert result.returncode == 1 and [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]
    reference = (run_dir / "reference" / "logps.pt").stat().st_mtime_ns
    assert_ok(sharpen("resume", str(run_dir)))
    assert (run_dir / "reference" / "logps.pt").stat().st_mtime_ns == reference
    assert "reference log-probabilities read from" in (run_dir / "logs" / "rank-0.log").read_text()
    want = [r["loss"] for r in train_rows(single_runs["full"])]
    assert_same([r["loss"] for r in train_rows(run_dir)], want, "resumed loss")
    assert_same(
        [r["eval/loss"] for r in eval_rows(run_dir)],
        [r["eval/loss"] for r in eval_rows(single_runs["full"])],
        "eval",
    )


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
