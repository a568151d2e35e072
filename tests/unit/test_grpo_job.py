"""The grpo job file: its settings and defaults, its rules across sections, and the reward inputs checked
in the launcher (exit 2, field path, hint) before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.errors import UserError
from launcher.jobfile import check_inputs, load_job
from launcher.spec import GRPOMethod, JobSpec
from training.rollout.rewards import load_reward_function

TESTS = Path(__file__).resolve().parents[1]
GOOD = TESTS / "fixtures" / "good_jobs"
BAD = TESTS / "fixtures" / "bad_jobs"
PROMPTS = GOOD / "data" / "prompts.jsonl"


def grpo_job(directory: Path, rewards: list[dict], data: list[dict] | None = None, **method) -> Path:
    job = {
        "model": {"path": "example-org/tiny-llama"},
        "method": {"kind": "grpo", "num_generations": 2, "rewards": rewards, **method},
        "data": {"train": data or [{"path": str(PROMPTS), "format": "prompt"}]},
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def error(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    with pytest.raises(UserError) as info:
        load_job(path, overrides)
    return str(info.value)


def test_the_defaults_are_the_issues():
    method = JobSpec.model_validate(
        {"model": {"path": "m"}, "method": {"kind": "grpo", "rewards": [{"function": "r.py:f"}]},
         "data": {"train": [{"path": "p.jsonl", "format": "prompt"}]}}
    ).method
    assert isinstance(method, GRPOMethod)
    assert (method.num_generations, method.max_completion_length, method.temperature, method.top_p) == (8, 256, 1.0, 1.0)
    assert (method.beta, method.loss, method.epsilon, method.epsilon_high) == (0.0, "dapo", 0.2, None)
    assert (method.scale_rewards, method.num_iterations) == ("group", 1)
    assert method.generation_kwargs.model_dump(exclude_none=True) == {}  # nothing passed on to generation
    assert [(r.function, r.model, r.weight) for r in method.rewards] == [("r.py:f", None, 1.0)]


def test_a_good_grpo_job_means_what_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # the reward file is found next to the job file, not where sharpen runs
    spec = load_job(GOOD / "grpo_prompts.yaml")
    method = spec.method
    assert (method.kind, method.num_generations, method.loss, method.epsilon_high) == ("grpo", 4, "dr_grpo", 0.28)
    assert method.generation_kwargs.model_dump(exclude_none=True) == {"min_new_tokens": 2, "top_k": 50}
    # resolved to absolute paths: every rank imports the same file wherever it starts
    assert [r.function for r in method.rewards] == [f"{GOOD / 'rewards.py'}:correct", f"{GOOD / 'rewards.py'}:short"]
    assert [r.weight for r in method.rewards] == [1.0, 0.5]
    assert load_reward_function(method.rewards[0].function)([], ["blue"], answer=["blue"]) == [1.0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.num_generations=1", "method.num_generations: 1 is out of range; must be >= 2"),
        ("method.max_completion_length=0", "method.max_completion_length: 0 is out of range; must be >= 1"),
        ("method.temperature=0", "method.temperature: 0 is out of range; must be > 0"),
        ("method.top_p=1.5", "method.top_p: 1.5 is out of range; must be > 0 and <= 1"),
        ("method.beta=-0.1", "method.beta: -0.1 is out of range; must be >= 0"),
        ("method.epsilon=0", "method.epsilon: 0 is out of range; must be > 0"),
        ("method.epsilon_high=0", "method.epsilon_high: 0 is out of range; must be > 0"),
        ("method.num_iterations=0", "method.num_iterations: 0 is out of range; must be >= 1"),
        ("method.scale_rewards=std", "method.scale_rewards: 'std' is not one of: group, batch, none"),
        ("method.loss=drgrpo", "method.loss: 'drgrpo' is not one of: grpo, dr_grpo, dapo; did you mean 'dr_grpo'?"),
        ("method.rewards=[]", "method.rewards: needs at least 1 item(s), got 0: []"),
        ("method.generation_kwargs.repetition_penalty=0", "method.generation_kwargs.repetition_penalty: 0 is out of range; must be > 0"),
        ("method.generation_kwargs.do_sample=false", "method.generation_kwargs.do_sample: unknown key; valid keys here: min_new_tokens, top_k, repetition_penalty"),
        ("method.generation_kwargs.max_new_tokens=9", "method.generation_kwargs.max_new_tokens: unknown key; did you mean 'method.max_completion_length'?"),
        ("train.global_batch_size=6", "train.global_batch_size: 6, the completions per step, is not a multiple of method.num_generations (4, one group per prompt); try 4 or 8"),
        ("method.rewards.0={model: a, function: 'b.py:c'}", "method.rewards.0: {function: 'b.py:c', model: a} is not valid: give exactly one of function"),
        ("method.rewards.0.function=rewards.py:correct()", "method.rewards.0.function: 'rewards.py:correct()' is not valid: write it as path/to/file.py:name"),
    ],
)
def test_each_bad_setting_is_exit_2_with_its_field(override: str, message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["plan", str(GOOD / "grpo_prompts.yaml"), "--set", override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    field, problem = message.split(": ", 1)
    assert field == override.split("=")[0]  # the override names the field, so its line does not repeat it
    assert f"\n  --set {override}: {problem}" in err, err


def test_grpo_has_no_evaluation_yet(tmp_path: Path):
    """An eval split of prompts would need a rollout per evaluation: refused by name, not a crash in a rank."""
    (tmp_path / "r.py").write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    message = error(grpo_job(tmp_path, [{"function": "r.py:f"}]), ["data.eval_split=0.1", "train.eval_every=2"])
    assert "1 problem" in message and "--set data.eval_split=0.1: grpo runs have no evaluation yet" in message, message
    assert "remove data.eval, data.eval_split and train.eval_every" in message


def test_reward_function_problems_are_exit_2_before_any_rank(capsys: pytest.CaptureFixture[str]):
    assert main(["plan", str(BAD / "grpo_reward_functions.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    problems = [line for line in err.splitlines()[1:] if not line.startswith("  hint:")]
    assert [line.split(":")[0].strip() for line in problems] == [f"method.rewards.{i}.function" for i in range(9)]


def test_signatures_are_checked_against_the_datas_columns(tmp_path: Path):
    (tmp_path / "r.py").write_text(
        "def by_solution(completions, solution, **kw):\n    return [0.0] * len(completions)\n"
        "def by_keywords(*, prompts, completions):\n    return [0.0] * len(completions)\n"
        "def positional_only(prompts, completions, /):\n    return [0.0] * len(completions)\n"
        "async def later(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    csv = tmp_path / "p.csv"
    csv.write_text("question,solution\n2+2=,4\n")
    data = [{"path": str(csv), "format": "prompt", "field": "question"}]
    spec = load_job(grpo_job(tmp_path, [{"function": "r.py:by_solution"}, {"function": "r.py:by_keywords"}], data))
    assert check_inputs(spec) == []  # solution is a column of the CSV; question is the prompt
    message = error(grpo_job(tmp_path, [{"function": "r.py:by_solution"}]))  # prompts.jsonl has no solution
    assert "method.rewards.0.function:" in message
    assert "its argument 'solution' gets no value: it is not prompts, completions or completion_ids, nor a column " \
           "of the data (its other columns: answer)" in message
    hub = [{"path": "some-org/math-prompts", "format": "prompt"}]  # its columns are not known here: not checked
    assert load_job(grpo_job(tmp_path, [{"function": "r.py:by_solution"}], hub)).method.rewards[0].weight == 1.0
    message = error(grpo_job(tmp_path, [{"function": "r.py:positional_only"}, {"function": "r.py:later"}]))
    assert "method.rewards.0.function:" in message and "its argument 'prompts' is positional-only" in message
    assert "method.rewards.1.function:" in message and "it is async; sharpen calls reward functions synchronously" in message


def test_files_of_the_same_name_in_two_directories_stay_apart(tmp_path: Path):
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rewards.py").write_text(f"def f(completions, **kw):\n    return [{value}]\n")
    assert load_reward_function(f"{tmp_path / 'a' / 'rewards.py'}:f")(completions=["x"]) == [1.0]
    assert load_reward_function(f"{tmp_path / 'b' / 'rewards.py'}:f")(completions=["x"]) == [2.0]


def test_a_module_beside_the_job_gets_a_hint_to_name_the_file(tmp_path: Path):
    (tmp_path / "scores.py").write_text("def f(completions, **kw):\n    return [0.0]\n")
    message = error(grpo_job(tmp_path, [{"function": "scores:f"}]))
    assert "method.rewards.0.function: 'scores:f': no module named 'scores'; scores.py is beside the job file: " \
           "write scores.py:NAME" in message


def reward_model_dir(root: Path, name: str, architecture: str | None, tokenizer: bool = True) -> Path:
    path = root / name
    path.mkdir()
    if architecture:
        (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_reward_model_directories_are_checked_like_model_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reward_model_dir(tmp_path, "rm", "LlamaForSequenceClassification")
    reward_model_dir(tmp_path, "causal", "LlamaForCausalLM")
    reward_model_dir(tmp_path, "no_tokenizer", "LlamaForSequenceClassification", tokenizer=False)
    reward_model_dir(tmp_path, "no_config", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    good = grpo_job(tmp_path, [{"model": "rm", "weight": 0.5}, {"model": "OpenAssistant/reward-model-deberta"}])
    spec = load_job(good)
    assert [r.model for r in spec.method.rewards] == [str(tmp_path / "rm"), "OpenAssistant/reward-model-deberta"]
    bad = grpo_job(tmp_path, [{"model": m} for m in ("causal", "no_tokenizer", "no_config", "./gone")])
    problems = error(bad).splitlines()[1:5]
    assert problems[0].startswith(f"  method.rewards.0.model: {str(tmp_path / 'causal')!r} is a LlamaForCausalLM, "
                                  "not a sequence-classification model")
    assert problems[1].startswith("  method.rewards.1.model: ") and "has no tokenizer" in problems[1]
    assert problems[2].endswith("has no config.json; give the directory save_pretrained wrote")
    assert problems[3].startswith("  method.rewards.3.model: './gone' does not exist")
