"""report.md's samples: the eval prompts found in the cache's rows, their greedy completions, the section."""

from __future__ import annotations

import json

import pytest
import torch
from support.data_inputs import ALPACA, prepared, write_jsonl

from training.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from training.report import write_report
from training.samples import SAMPLES_FILE, EvalSamples, eval_prompts, report_section, shown

CHAT = {"messages": [
    {"role": "user", "content": "Give the opposite.\nhot"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "Name the color.\nsky"},
    {"role": "assistant", "content": "The sky is blue."},
]}
PAIRS = [
    {"prompt": "### Instruction:\nName the color.\n\n### Input:\nbanana\n\n### Response:\n",
     "chosen": "The banana is yellow.", "rejected": "Maybe the banana is red."},
    {"prompt": "### Instruction:\nName the color.\n\n### Input:\nbanana\n\n### Response:\n",
     "chosen": "Yellow.", "rejected": "Red."},
    {"prompt": "### Instruction:\nCount from 1 to 3.\n\n### Response:\n", "chosen": "1 2 3", "rejected": "Maybe 1 2"},
]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def texts(tokenizer, found) -> list[tuple[str, str, str]]:
    return [(tokenizer.decode(p.prompt_ids), tokenizer.decode(p.reference_ids), p.reference) for p in found]


def test_sft_prompts_are_the_tokens_before_the_answer_in_every_packed_sample(model_dir, tokenizer, tmp_path):
    """Packed rows hold several samples: each gives its prompt, in row order, its output the reference."""
    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA), packing=True)
    assert len(rows) == 1 and len(rows[0]["segment_lengths"]) == 3
    found = texts(tokenizer, eval_prompts(rows, "sft", 3, tokenizer.bos_token_id))
    laid = []  # the records in the order packing laid them
    start = 0
    for length in rows[0]["segment_lengths"]:
        laid.append(tokenizer.decode(rows[0]["input_ids"][start : start + length]))
        start += length
    want = []
    for record in ALPACA:
        prompt = (ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT).format(**record)
        want.append(("<s>" + prompt, record["output"] + "</s>", "reference answer"))
    assert sorted(found) == sorted(want)
    assert [f[0] + f[1] for f in found] == laid
    assert len(eval_prompts(rows, "sft", 2, tokenizer.bos_token_id)) == 2


def test_a_conversation_gives_its_first_turns_and_first_answer(model_dir, tokenizer, tmp_path):
    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "c.jsonl", [CHAT]), "chat")
    ((prompt, answer, _),) = texts(tokenizer, eval_prompts(rows, "sft", 3, tokenizer.bos_token_id))
    assert prompt == "<s>" + tokenizer.apply_chat_template(CHAT["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert answer == "cold<|end|>\n"


def test_preference_pairs_give_the_chosen_answer_once_per_prompt(model_dir, tokenizer, tmp_path):
    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "p.jsonl", PAIRS), "preference")
    found = texts(tokenizer, eval_prompts(rows, "dpo", 3, tokenizer.bos_token_id))
    assert found == [("<s>" + PAIRS[0]["prompt"], PAIRS[0]["chosen"] + "</s>", "chosen"),
                     ("<s>" + PAIRS[2]["prompt"], PAIRS[2]["chosen"] + "</s>", "chosen")]


def test_feedback_records_say_whether_their_completion_is_desirable(model_dir, tokenizer, tmp_path):
    records = [{"prompt": "2+2? ", "completion": "4", "label": True}, {"prompt": "3+3? ", "completion": "7", "label": False}]
    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "f.jsonl", records), "feedback")
    found = texts(tokenizer, eval_prompts(rows, "kto", 3, tokenizer.bos_token_id))
    assert [(f[1].strip(), f[2]) for f in found] == [("4</s>", "completion (desirable)"), ("7</s>", "completion (undesirable)")]


@pytest.mark.parametrize(
    "kind,fmt,train_on,why",
    [
        ("sft", "text", "completion", "no eval sequence has a prompt before its first label token"),
        ("sft", "alpaca", "all", "no eval sequence has a prompt before its first label token"),
        ("pretrain", "text", "completion", "method pretrain: its text has no prompt to complete"),
        ("reward", "preference", "completion", "method reward: a reward model does not generate"),
    ],
)
def test_runs_without_prompts_say_why_in_the_rank_log(model_dir, tokenizer, tmp_path, caplog, kind, fmt, train_on, why):
    data = {"text": [{"text": "Some document text."}], "alpaca": ALPACA, "preference": PAIRS}[fmt]
    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "d.jsonl", data), fmt, train_on=train_on)
    with caplog.at_level("INFO", logger="sharpen"):
        assert EvalSamples.for_run(kind, 3, None, rows, tokenizer, tmp_path) is None
        assert EvalSamples.for_run("sft", 3, None, None, tokenizer, tmp_path) is None
        assert EvalSamples.for_run("sft", 0, None, rows, tokenizer, tmp_path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"samples: none in report.md ({why})",
        "samples: none in report.md (the job has no eval data (data.eval or data.eval_split))",
        "samples: none in report.md (logging.samples is 0)",
    ]


def greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """A plain argmax decode, the whole sequence run again for every token (no cache)."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
    return out


def test_completions_before_and_after_training_reach_the_report(model_dir, tokenizer, tmp_path):
    """A fresh run writes the initial model's greedy completions; a resumed one reads them back and adds the
    trained model's; report.md shows prompt, before, after and reference of each."""
    from transformers import AutoModelForCausalLM

    from strategies.base import DistEnv, StrategyOptions
    from strategies.single import SingleStrategy

    rows = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    strategy = SingleStrategy(StrategyOptions(), DistEnv())
    strategy.setup(model, lambda p: torch.optim.SGD(p, lr=0.0), lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fresh = EvalSamples.for_run("sft", 2, strategy, rows, tokenizer, run_dir)
    fresh.max_new_tokens = 12
    fresh.before_training(fresh=True)
    prompts = [p.prompt_ids for p in fresh.prompts]
    want_before = [tokenizer.decode(greedy(model.eval(), p, 12, tokenizer.eos_token_id), skip_special_tokens=True)
                   for p in prompts]
    assert [s["before"] for s in json.loads((run_dir / SAMPLES_FILE).read_text())["samples"]] == want_before

    trained = torch.nn.Linear(model.config.hidden_size, len(tokenizer))  # "training": a bias toward one token
    with torch.no_grad():
        trained.weight.copy_(model.lm_head.weight)
        trained.bias.zero_()[tokenizer.convert_tokens_to_ids("7")] = 1e4
    model.lm_head = trained
    resumed = EvalSamples.for_run("sft", 2, strategy, rows, tokenizer, run_dir)
    resumed.max_new_tokens = 12
    resumed.before_training(fresh=False)
    resumed.after_training(step=6)
    write_report(run_dir, {"job": {"name": "samples"}, "strategy": "single", "world_size": 1, "device": "cpu"})
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## Samples from the eval data"):]
    assert "The first 2 eval prompts, completed greedily (at most 12 new tokens) before training and after step 6." in section
    after = json.loads((run_dir / SAMPLES_FILE).read_text())["samples"]
    assert [s["before"] for s in after] == want_before
    assert all(s["after"] == "7" * 12 for s in after), after
    first = ALPACA_PROMPT_WITH_INPUT.format(**ALPACA[0])
    assert section.count("### Sample ") == 2
    assert f"Prompt:\n\n```text\n{first}\n```" in section
    assert f"Before training:\n\n```text\n{shown(want_before[0])}\n```" in section
    assert "After step 6:\n\n```text\n777777777777\n```" in section
    assert "Reference answer in the data:\n\n```text\n7\n```" in section


def test_the_section_fences_backticks_and_says_what_was_not_recorded(tmp_path):
    record = {"max_new_tokens": 48, "after_step": 3, "samples": [
        {"prompt": "Quote ```code```", "after": "", "reference": "chosen", "reference_text": "o\x10k"}]}
    (tmp_path / SAMPLES_FILE).write_text(json.dumps(record))
    lines = "\n".join(report_section(tmp_path))
    assert "Prompt:\n\n````text\nQuote ```code```\n````" in lines
    assert "Before training: (not recorded)" in lines
    assert "After step 3: (nothing: the end of the sequence came first)" in lines
    assert "Chosen in the data:\n\n```text\no\\x10k\n```" in lines  # a control character escaped
    assert report_section(tmp_path / "none") == []
