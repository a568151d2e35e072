"""ORPO, SimPO and DPO's sft_weight (RPO) in one process: each loss against its paper's formula computed by
hand on a fixed batch, exact over any split into micro-batches, the plan holding no reference for the
reference-free ones, and bad settings refused by the job loader (exit 2, the field, a hint)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from support import preference_jobs
from support.e2e import ALPACA, write_job
from support.preference_jobs import PREFS, alone, dpo_job

from launcher.cli import main
from launcher.jobfile import load_job
from launcher.method_spec import PAIR_METHODS
from launcher.spec import DataSpec, DPOMethod, JobSpec, ORPOMethod, SimPOMethod
from training.data import cache as C
from training.data import prepare as D
from training.data.packing import collate
from training.methods import create_method
from training.methods.dpo_reference import AdapterDisabledReference

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model = preference_jobs.tiny_model
cache = preference_jobs.cache


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- the papers' formulas, in plain floats


def orpo_formula(chosen: float, rejected: float, beta: float) -> dict[str, float]:
    """Hong et al. 2024, Eqs. 4-7 as TRL's ORPOTrainer computes them, from length-averaged log-probs."""
    odds = lambda logp: logp - math.log(1 - math.exp(logp))  # noqa: E731  log(p / (1 - p))
    log_odds = odds(chosen) - odds(rejected)
    return {
        "loss": -chosen - beta * log_sigmoid(log_odds),
        "nll_loss": -chosen,
        "log_odds_ratio": log_sigmoid(log_odds),
        "log_odds_chosen": log_odds,
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
    }


def simpo_formula(chosen: float, rejected: float, beta: float, gamma: float) -> dict[str, float]:
    """Meng et al. 2024, Eq. 6: -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)."""
    return {
        "loss": -log_sigmoid(beta * chosen - beta * rejected - gamma),
        "margin_minus_gamma": beta * (chosen - rejected) - gamma,
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
    }


def rpo_formula(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, beta, sft_weight) -> dict[str, float]:
    """Pang et al. 2024: DPO's -log σ(β·h) plus sft_weight × -log π(y_w|x) / |y_w|."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    nll = -chosen / chosen_tokens
    return {
        "loss": -log_sigmoid(beta * h) + sft_weight * nll,
        "nll_loss": nll,
        "rewards/chosen": beta * (chosen - ref_chosen),
        "rewards/rejected": beta * (rejected - ref_rejected),
    }


# ---------------------------------------------------------------- the loss of a fixed batch


def prepared_rows(model_dir: Path, cache: Path, indices=(0, 5, 9)) -> list[dict]:
    spec = DataSpec(train=[{"path": str(PREFS), "format": "preference"}], max_length=96)
    ds = C.load_prepared(D.prepare_dataset(spec, "dpo", str(model_dir), cache_root=cache))
    return [ds[i] for i in indices]




def pair_sequences(row: dict) -> list[tuple[list[int], list[int]]]:
    cut = row["segment_lengths"][0]
    return [(row["input_ids"][:cut], row["labels"][:cut]), (row["input_ids"][cut:], row["labels"][cut:])]


@pytest.fixture(scope="module")
def models(tiny_model):
    """A LoRA policy with a random (non-zero) adapter, and its base loaded separately, both in float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64), config)
    return policy, base


SETTINGS = {
    "orpo": ORPOMethod(kind="orpo", beta=0.3),
    "simpo": SimPOMethod(kind="simpo", beta=2.0, gamma=0.5),
    "rpo": DPOMethod(kind="dpo", beta=0.5, sft_weight=0.7),
}


def hand_computed(kind: str, policy, base, rows: list[dict]) -> dict[str, float]:
    """The method's loss and metric sums over `rows`, each sequence run alone and the formula in floats."""
    s, sums = SETTINGS[kind], {}
    for row in rows:
        (pc, nc), (pr, nr) = (alone(policy, *seq) for seq in pair_sequences(row))
        if kind == "orpo":
            terms = orpo_formula(pc / nc, pr / nr, s.beta)
        elif kind == "simpo":
            terms = simpo_formula(pc / nc, pr / nr, s.beta, s.gamma)
        else:
            (rc, _), (rr, _) = (alone(base, *seq) for seq in pair_sequences(row))
            terms = rpo_formula(pc, pr, rc, rr, nc, s.beta, s.sft_weight)
        terms["rewards/margin"] = terms["rewards/chosen"] - terms["rewards/rejected"]
        terms["rewards/accuracy"] = float(terms["rewards/margin"] > 0)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
    return sums


def loss_of(kind: str, policy):
    s = SETTINGS[kind]
    return create_method(s.kind, s, AdapterDisabledReference(policy) if s.kind == "dpo" else None)


@pytest.mark.parametrize("kind", ["orpo", "simpo", "rpo"])
def test_loss_of_a_fixed_batch_equals_the_papers_formula(tiny_model, cache, models, kind):
    """Three pairs in one padding-free row against each sequence run alone: loss and metric sums to 1e-6."""
    policy, base = models
    rows = prepared_rows(tiny_model, cache)
    out = loss_of(kind, policy)(policy, collate(rows))
    want = hand_computed(kind, policy, base, rows)
    got = {"loss": out.loss_sum.item(), **{k: v.item() for k, v in out.metric_sums.items()}}
    assert set(want) <= set(got), (sorted(want), sorted(got))
    for name, value in want.items():
        assert math.isclose(got[name], value, rel_tol=1e-6, abs_tol=1e-9), (name, got[name], value)
    assert out.loss_sum.requires_grad


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_chat_prompts_are_rendered_with_the_template_and_scored_the_same_way(tiny_model, cache, models, tmp_path, kind):
    """Message-list prompts (system + user turns) go through the chat template as DPO's do; the loss over
    those rows still equals the formula."""
    import json

    policy, base = models
    records = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{a}+{a}?"}],
         "chosen": str(2 * a), "rejected": f"Maybe {2 * a + 1}"}
        for a in (2, 3, 4)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = DataSpec(train=[{"path": str(path), "format": "preference"}], max_length=96)
    rows = list(C.load_prepared(D.prepare_dataset(spec, kind, str(tiny_model), cache_root=cache)))
    from transformers import AutoTokenizer

    chosen = AutoTokenizer.from_pretrained(tiny_model).decode(rows[0]["input_ids"][: rows[0]["segment_lengths"][0]])
    assert len(rows) == 3 and chosen.startswith("<s><|system|>\nBe brief.<|end|>\n<|user|>\n2+2?"), chosen
    out = loss_of(kind, policy)(policy, collate(rows))
    want = hand_computed(kind, policy, base, rows)
    assert math.isclose(out.loss_sum.item(), want["loss"], rel_tol=1e-6), (out.loss_sum.item(), want["loss"])


@pytest.mark.parametrize("kind", ["orpo", "simpo", "rpo"])
def test_the_loss_sum_is_the_same_over_any_split_into_micro_batches(tiny_model, cache, models, kind):
    """Per-pair terms (the NLL averaged per chosen answer too) summed: one micro-batch of four pairs
    equals one of one pair plus one of three, so dividing the step's sum by its pairs is exact."""
    policy, _ = models
    rows = prepared_rows(tiny_model, cache, (0, 3, 5, 9))
    method = loss_of(kind, policy)
    whole = method(policy, collate(rows))
    first, rest = method(policy, collate(rows[:1])), method(policy, collate(rows[1:]))
    assert math.isclose(whole.loss_sum.item(), first.loss_sum.item() + rest.loss_sum.item(), rel_tol=1e-6)
    for name, value in whole.metric_sums.items():
        split = first.metric_sums[name].item() + rest.metric_sums[name].item()
        assert math.isclose(value.item(), split, rel_tol=1e-6, abs_tol=1e-9), name


def test_the_defaults_are_the_issues():
    """The contract of issue 16: orpo beta 0.1, simpo beta 2.0 and gamma 0.5, dpo sft_weight 0 (plain DPO)."""
    assert DPOMethod(kind="dpo").sft_weight == 0.0
    assert (ORPOMethod(kind="orpo").beta, SimPOMethod(kind="simpo").beta, SimPOMethod(kind="simpo").gamma) == (
        0.1,
        2.0,
        0.5,
    )


def test_sft_weight_adds_its_nll_and_leaves_the_dpo_term(tiny_model, cache, models):
    policy, _ = models
    rows = prepared_rows(tiny_model, cache)
    dpo = create_method("dpo", DPOMethod(kind="dpo", beta=0.5), AdapterDisabledReference(policy))
    rpo = loss_of("rpo", policy)
    plain, with_nll = dpo(policy, collate(rows)), rpo(policy, collate(rows))
    assert "nll_loss" not in plain.metric_sums
    nll = with_nll.metric_sums["nll_loss"].item()
    assert math.isclose(with_nll.loss_sum.item() - plain.loss_sum.item(), 0.7 * nll, rel_tol=1e-6)
    assert plain.metric_sums["rewards/margin"].item() == with_nll.metric_sums["rewards/margin"].item()


# ---------------------------------------------------------------- the plan


def preference_job(model: Path, cache: Path, method: dict, finetune: str = "full") -> dict:
    job = dpo_job(model, cache, finetune, "single", 1)
    job["method"] = method
    return job


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_the_plan_holds_no_reference_and_counts_pairs(tiny_model, cache, tmp_path, capsys, kind):
    """No reference model, said in `sharpen plan`; activations sized for two sequences a row, as DPO's."""
    from launcher.planner import build_plan
    from launcher.report import print_plan

    plans = {}
    for name, method in ((kind, {"kind": kind}), ("dpo", {"kind": "dpo", "reference": "precompute"})):
        spec = load_job(write_job(tmp_path / f"{name}.yaml", preference_job(tiny_model, cache, method)))
        plans[name], _ = build_plan(spec, tmp_path / name)
    assert kind in PAIR_METHODS and plans[kind].reference is None and plans["dpo"].reference is not None
    activations = {k: p.chosen["bytes_per_rank"]["activations"] for k, p in plans.items()}
    assert activations[kind] == activations["dpo"] > 0
    print_plan(plans[kind])
    out = capsys.readouterr().out
    assert f"none: {kind} holds no reference model" in " ".join(out.split()), out


# ---------------------------------------------------------------- bad input


@pytest.fixture
def orpo_file(tmp_path: Path) -> Path:
    job = {
        "model": {"path": "example-org/tiny-llama"},
        "method": {"kind": "orpo"},
        "data": {"train": [{"path": str(PREFS), "format": "preference"}]},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.beta=0", "0 is out of range; must be > 0"),
        ("method={kind: simpo, beta: -1}", "method.beta: -1 is out of range; must be > 0"),
        ("method={kind: simpo, gamma: -0.1}", "method.gamma: -0.1 is out of range; must be >= 0"),
        ("method={kind: dpo, sft_weight: -1}", "method.sft_weight: -1 is out of range; must be >= 0"),
        ("method.gamma=0.5", "unknown key for method.kind 'orpo'; gamma is a setting of kind simpo"),
        ("method={kind: simpo, simpo_gamma: 1}", "method.simpo_gamma: unknown key; did you mean 'gamma'?"),
        ("method={kind: dpo, rpo_alpha: 1}", "method.rpo_alpha: unknown key; did you mean 'sft_weight'?"),
        ("data.train.0.format=alpaca", "'alpaca' does not fit method.kind 'orpo', which reads format preference"),
    ],
)
def test_each_bad_setting_is_exit_2_with_its_field_and_a_hint(orpo_file, override, message, capsys):
    assert main(["plan", str(orpo_file), "--set", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert f"\n  --set {override}: {message}" in err, err
    assert "\n  hint: " in err


def test_preference_data_for_a_supervised_method_names_every_pair_method(tiny_model, tmp_path):
    """The tip lists the kinds that read preference data, the new ones among them."""
    job = preference_job(tiny_model, tmp_path / "cache", {"kind": "sft"})
    with pytest.raises(Exception) as info:
        JobSpec.model_validate(job)
    assert "preference data is for method.kind dpo, reward, orpo or simpo" in str(info.value)
    job = preference_job(tiny_model, tmp_path / "cache", {"kind": "simpo"})
    job["data"]["train"] = [{"path": str(ALPACA), "format": "alpaca"}]
    with pytest.raises(Exception) as info:
        JobSpec.model_validate(job)
    assert "'alpaca' does not fit method.kind 'simpo', which reads format preference" in str(info.value)
