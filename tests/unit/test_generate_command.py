"""`sharpen generate` in-process on the tiny model: the JSON lines a user reads, seeded, greedy as a plain
argmax decode, prompts through the chat template, and bad input as one message (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.cli import main

PROMPTS = [
    {"prompt": "Give the opposite of loud."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]},
    "Repeat the word three times: moon",
]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS) + "\n")
    return path


def generate(capsys, *args) -> list[dict]:
    assert main(["generate", *map(str, args)]) == 0
    captured = capsys.readouterr()
    assert "sharpen: " in captured.err and "tokens/s" in captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def test_samples_are_seeded_and_n_gives_k_completions_per_prompt(tiny_model, prompts_file, capsys):
    args = (tiny_model, "--prompts", prompts_file, "--n", 2, "--temperature", 1.0, "--max-new-tokens", 6,
            "--device", "cpu", "--batch-size", 4)
    first = generate(capsys, *args, "--seed", 1)
    assert sorted((r["index"], r["sample"]) for r in first) == [(i, k) for i in range(3) for k in range(2)]
    assert generate(capsys, *args, "--seed", 1) == first
    other = generate(capsys, *args, "--seed", 2)
    assert [r["completion"] for r in other] != [r["completion"] for r in first]
    # An untrained model rarely says EOS: every completion runs to --max-new-tokens.
    assert {(r["finish_reason"], r["completion_tokens"]) for r in first} == {("length", 6)}
    assert {r["index"]: r["prompt"] for r in first} == {0: PROMPTS[0]["prompt"], 1: PROMPTS[1]["messages"], 2: PROMPTS[2]}


def test_greedy_is_the_argmax_decode_of_the_chat_formatted_prompt(tiny_model, prompts_file, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tiny_model), "--prompts", str(prompts_file), "--max-new-tokens", "5",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "3 completions of 3 prompts, 15 tokens" in capsys.readouterr().err
    rows = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    texts = [
        "<|user|>\nGive the opposite of loud.<|end|>\n<|assistant|>\n",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nName a colour.<|end|>\n<|assistant|>\n",
        "<|user|>\nRepeat the word three times: moon<|end|>\n<|assistant|>\n",
    ]
    for index, text in enumerate(texts):
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert rows[index]["prompt_tokens"] == len(ids)
        new = []
        for _ in range(5):  # a full forward per token, no cache
            with torch.no_grad():
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        assert rows[index]["completion"] == tokenizer.decode(new, skip_special_tokens=True)
    # --raw: a text prompt as it is, no template around it
    raw = generate(capsys, tiny_model, "--prompts", prompts_file, "--max-new-tokens", 1, "--raw", "--device", "cpu")
    by_index = {r["index"]: r for r in raw}
    assert by_index[0]["prompt_tokens"] == 1 + len(tokenizer("Give the opposite of loud.", add_special_tokens=False)["input_ids"])


def test_a_broken_prompts_line_and_a_bad_source_are_one_message_each(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "cut\n')
    assert main(["generate", str(tiny_model), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2: not JSON") and "Traceback" not in err
    bad.write_text('{"prompt": "fine"}\n\n{"messages": [{"role": "narrator", "content": "x"}]}\n')
    assert main(["generate", str(tiny_model), "--prompts", str(bad)]) == 2
    assert f"{bad}:3: messages[0] is not" in capsys.readouterr().err
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["generate", str(tiny_model), "--prompts", str(bad)]) == 2
    assert f'{bad}:1: expected {{"prompt": "text"}}' in capsys.readouterr().err
    (tmp_path / "not-a-model").mkdir()
    assert main(["generate", str(tmp_path / "not-a-model"), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'not-a-model'}: is not a run dir (plan.json), an export dir")
