"""Scoring completions for GRPO: reward functions called as TRL calls them, None and weights by TRL's
nansum rule, one RewardError per bad value, and reward models scoring as they were trained."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.spec import RewardSpec
from training.rollout.scoring import RewardError, RewardModel, RewardScorer

REWARDS = '''
seen = {}

def has_blue(prompts, completions, **kwargs):
    seen["has_blue"] = {"prompts": prompts, "completions": completions, **kwargs}
    return [1.0 if "blue" in c else 0.0 for c in completions]

def length(completions, **kwargs):
    return [float(len(c)) for c in completions]

def named_only(completions, answer):
    seen["named_only"] = {"completions": completions, "answer": answer}
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

def chat_content(prompts, completions, **kwargs):
    seen["chat_content"] = {"prompts": prompts, "completions": completions}
    return [float(len(c[0]["content"])) for c in completions]

def maybe(prompts, completions, **kwargs):
    return [None if "skip" in c else 2.0 for c in completions]

def never(prompts, completions, **kwargs):
    return [None] * len(completions)

def as_numpy(prompts, completions, **kwargs):
    import numpy
    return numpy.arange(len(completions), dtype=numpy.float32)

def short(prompts, completions, **kwargs):
    return [1.0]

def text_at_2(prompts, completions, **kwargs):
    return [0.0, 1.0, "good", 3.0]

def nan_at_1(prompts, completions, **kwargs):
    return [0.0, float("nan"), 1.0, 1.0]

def not_a_list(prompts, completions, **kwargs):
    return 3.0

def raises(prompts, completions, **kwargs):
    raise KeyError("answer")
'''
PROMPTS = ["Sky: ", "Sky: ", "Grass: ", "Grass: "]
COMPLETIONS = ["blue", "grey", "green skip", "blue-green"]
COLUMNS = {"answer": ["blue", "blue", "green", "green"]}


@pytest.fixture()
def rewards_file(tmp_path: Path) -> Path:
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def scorer(path: Path, *names_weights: tuple[str, float]) -> RewardScorer:
    return RewardScorer([RewardSpec(function=f"{path.name}:{n}", weight=w) for n, w in names_weights], base=path.parent)


def module(path: Path):
    """The loaded rewards module, to read what the functions were given."""
    import sys

    return next(m for name, m in sys.modules.items() if name.startswith("sharpen_reward_rewards_") and
                getattr(m, "__file__", "") == str(path.resolve()))


def test_functions_get_trls_arguments_and_are_summed_by_weight(rewards_file: Path):
    s = scorer(rewards_file, ("has_blue", 1.0), ("length", 0.5), ("named_only", -2.0))
    ids = [[5, 6], [7], [8, 9, 10], [11]]
    total, per = s.score(PROMPTS, COMPLETIONS, COLUMNS, step=3, completion_ids=ids)
    assert s.names == ["has_blue", "length", "named_only"]
    assert per["has_blue"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert per["length"].tolist() == [4.0, 4.0, 10.0, 10.0]
    assert per["named_only"].tolist() == [1.0, 0.0, 0.0, 0.0]
    # 1*has_blue + 0.5*length - 2*named_only, by hand
    assert total.tolist() == [1 + 2 - 2, 0 + 2, 0 + 5, 1 + 5]
    assert total.dtype == torch.float32
    seen = module(rewards_file).seen
    assert seen["has_blue"] == {"prompts": PROMPTS, "completions": COMPLETIONS, "answer": COLUMNS["answer"],
                                "completion_ids": ids}
    assert seen["named_only"] == {"completions": COMPLETIONS, "answer": COLUMNS["answer"]}  # what it names only


def test_chat_prompts_give_completions_as_assistant_messages(rewards_file: Path):
    prompts = [[{"role": "user", "content": "Sky?"}]] * 2
    total, _ = scorer(rewards_file, ("chat_content", 1.0)).score(prompts, ["blue", "grey!"], {}, step=0)
    assert total.tolist() == [4.0, 5.0]
    seen = module(rewards_file).seen["chat_content"]
    assert seen["completions"] == [[{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "grey!"}]]
    assert seen["prompts"] == prompts


def test_none_is_no_reward_left_out_of_the_weighted_sum(rewards_file: Path):
    s = scorer(rewards_file, ("maybe", 1.0), ("has_blue", 3.0), ("never", 10.0))
    total, per = s.score(PROMPTS, COMPLETIONS, COLUMNS, step=0)
    assert math.isnan(per["maybe"][2]) and per["maybe"][[0, 1, 3]].tolist() == [2.0, 2.0, 2.0]
    assert per["never"].isnan().all()
    assert total.tolist() == [2 + 3, 2, 0, 2 + 3]  # NaN terms are dropped (nansum), not counted as 0 weight
    only_none = scorer(rewards_file, ("maybe", 1.0), ("never", 1.0))
    total, _ = only_none.score(PROMPTS, COMPLETIONS, COLUMNS, step=0)
    assert total[[0, 1, 3]].tolist() == [2.0, 2.0, 2.0] and math.isnan(total[2])  # no reward scored it: NaN


def test_arrays_count_as_lists(rewards_file: Path):
    total, _ = scorer(rewards_file, ("as_numpy", 2.0)).score(PROMPTS, COMPLETIONS, COLUMNS, step=0)
    assert total.tolist() == [0.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("short", "reward 'short' at step 7: returned 1 rewards for 4 completions"),
        ("text_at_2", "reward 'text_at_2' at step 7 (completion 2): returned str 'good', not a number"),
        ("nan_at_1", "reward 'nan_at_1' at step 7 (completion 1): returned nan, not a finite number (None means no reward)"),
        ("not_a_list", "reward 'not_a_list' at step 7: returned float, not a list of 4 rewards"),
        ("raises", "reward 'raises' at step 7: raised KeyError: 'answer'"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_reward_and_the_step(rewards_file: Path, name: str, message: str):
    s = scorer(rewards_file, ("has_blue", 1.0), (name, 1.0))
    with pytest.raises(RewardError) as info:
        s.score(PROMPTS, COMPLETIONS, COLUMNS, step=7)
    assert str(info.value) == message
    assert (info.value.reward, info.value.step) == (name, 7)


def test_a_package_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text("def one(completions, **kw):\n    return [1] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = RewardScorer([RewardSpec(function="mypkg.scores:one", weight=0.25)])
    assert s.score(["a", "b"], ["x", "y"], {}, step=0)[0].tolist() == [0.25, 0.25]


# ---- reward models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A tiny Llama saved as a one-label sequence classifier, with its tokenizer: a reward model's final/."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from training.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path_factory.mktemp("base") / "m", seed=1)
    out = tmp_path_factory.mktemp("rm") / "final"
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far apart, so a wrong token would show
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def one_by_one(path: Path, ids_per_text: list[list[int]]) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in ids_per_text]


def test_a_reward_model_scores_batches_as_each_text_alone(reward_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_model)
    prompts = ["The quick brown ", "The quick brown ", "Sharded data ", "Fine-tuning adapts a pretrained "]
    completions = ["fox jumps.", "dog", "parallel training splits parameters across ranks.", "model"]
    scorer = RewardScorer([RewardSpec(model=str(reward_model), weight=2.0)], batch_size=3)  # two batches, padded
    total, per = scorer.score(prompts, completions, {}, step=0)
    # as sharpen trains a reward model on string pairs: prompt + completion, BOS and EOS once each
    texts = [[tok.bos_token_id, *tok(p + c, add_special_tokens=False)["input_ids"], tok.eos_token_id]
             for p, c in zip(prompts, completions, strict=True)]
    expected = one_by_one(reward_model, texts)
    name = f"{reward_model.parent.name}/final"  # the model's last two path parts
    assert scorer.names == [name]
    assert per[name].tolist() == pytest.approx(expected, abs=1e-5)
    assert total.tolist() == pytest.approx([2 * e for e in expected], abs=2e-5)
    assert len(set(np.round(expected, 3))) == 4  # the four texts really score differently


def test_a_reward_model_renders_chat_prompts_with_its_template(reward_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_model)
    prompts = [[{"role": "user", "content": "Add the two numbers."}], [{"role": "user", "content": "Hi"}]]
    completions = ["7", "Hello there, how are you?"]
    rm = RewardModel(str(reward_model), dtype=torch.float32, device="cpu")
    assert rm.text(prompts[0], "7") == "<|user|>\nAdd the two numbers.<|end|>\n<|assistant|>\n7<|end|>\n"
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
             for p, c in zip(prompts, completions, strict=True)]
    ids = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in texts]
    assert rm(prompts, completions).tolist() == pytest.approx(one_by_one(reward_model, ids), abs=1e-5)
    assert not rm.model.training and not any(p.requires_grad for p in rm.model.parameters())  # frozen


def test_a_reward_model_loads_in_the_given_dtype(reward_model: Path):
    rm = RewardModel(str(reward_model), dtype=torch.bfloat16)
    assert {p.dtype for p in rm.model.parameters()} == {torch.bfloat16}
    scores = rm(["The quick brown "], ["fox"])
    assert scores.dtype == torch.float32 and scores.shape == (1,)
