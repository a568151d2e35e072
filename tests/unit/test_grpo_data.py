"""The `prompt` data format (what grpo reads): prompt ids to generate from, and the prompt and the other
columns as the reward functions get them, tokenized once into the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.prompts import read_prompt

CHAT_PROMPT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}]
RECORDS = [
    {"prompt": "Add the two numbers. 3 and 4: ", "answer": "7", "level": 1},
    {"prompt": CHAT_PROMPT, "answer": "blue", "level": 2},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(model: Path, cache: Path, *files: Path, **data):
    spec = DataSpec(train=[{"path": str(f), "format": "prompt"} for f in files], **data)
    return C.load_prepared(D.prepare_dataset(spec, "grpo", str(model), cache_root=cache, train_on="all"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_string_and_chat_prompts_become_ids_to_continue(tiny_model: Path, tokenizer, tmp_path: Path):
    ds = prepare(tiny_model, tmp_path / "cache", write_jsonl(tmp_path / "p.jsonl", RECORDS))
    assert ds.column_names == ["input_ids", "length", "prompt", "columns"]  # no labels: nothing learns from a prompt
    text, chat = (read_prompt(row) for row in ds)
    bos = tokenizer.bos_token_id
    # a string prompt as it is, BOS first and no EOS: generation continues it
    assert text.input_ids == [bos, *tokenizer(RECORDS[0]["prompt"], add_special_tokens=False)["input_ids"]]
    assert (text.prompt, text.is_chat, text.columns) == (RECORDS[0]["prompt"], False, {"answer": "7", "level": 1})
    # messages through the chat template with its generation prompt: the ids end where the answer begins
    rendered = "<|system|>\nAnswer in one word.<|end|>\n<|user|>\nSky colour?<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(chat.input_ids) == tokenizer.bos_token + rendered
    assert chat.input_ids == [bos, *tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert (chat.prompt, chat.is_chat, chat.columns) == (CHAT_PROMPT, True, {"answer": "blue", "level": 2})
    assert ds["length"] == [len(text.input_ids), len(chat.input_ids)]
    meta = json.loads((Path(ds.cache_files[0]["filename"]).parent / C.META_FILE).read_text())
    assert (meta["rows"], meta["tokens"], meta["label_tokens"]) == (2, len(text.input_ids) + len(chat.input_ids), 0)


def test_columns_whose_types_differ_between_files_are_kept(tiny_model: Path, tmp_path: Path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "2+2=", "answer": 4}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Capital of France? ", "answer": "Paris", "aliases": ["paris"]}])
    rows = [read_prompt(row) for row in prepare(tiny_model, tmp_path / "cache", a, b)]
    assert [r.columns for r in rows] == [{"answer": 4}, {"answer": "Paris", "aliases": ["paris"]}]


def test_max_length_caps_the_prompt_as_truncation_says(tiny_model: Path, tokenizer, tmp_path: Path):
    long = {"prompt": "Sharded data parallel training splits parameters, gradients and optimizer state.", "n": 1}
    short = {"prompt": "Hi", "n": 2}
    path = write_jsonl(tmp_path / "p.jsonl", [long, short])
    full = [tokenizer.bos_token_id, *tokenizer(long["prompt"], add_special_tokens=False)["input_ids"]]
    assert len(full) > 8
    right = prepare(tiny_model, tmp_path / "c1", path, max_length=8)
    assert [read_prompt(r).input_ids for r in right][0] == full[:8]
    assert read_prompt(right[0]).prompt == long["prompt"]  # the reward functions still get the whole prompt
    dropped = prepare(tiny_model, tmp_path / "c2", path, max_length=8, truncation="drop")
    assert [read_prompt(r).columns["n"] for r in dropped] == [2]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([RECORDS[0], {"question": "no prompt here", "answer": "x"}],
         r"data.train\[0\] \(.*p.jsonl\): record 2 \(line 2\): field 'prompt' is missing"),
        ([RECORDS[0], {"prompt": 7}], r"record 2 \(line 2\): field 'prompt' must be a string or a list of messages, got int"),
        ([{"prompt": [{"content": "no role"}]}], r"record 1 \(line 1\): prompt\[0\] needs a string 'role'"),
        ([{"question": "2+2"}], r"the records have no field 'prompt' \(format: prompt\); their fields are question"),
    ],
)
def test_a_bad_record_names_its_file_and_line(tiny_model: Path, tmp_path: Path, records: list[dict], message: str):
    with pytest.raises(UserError, match=message) as info:
        prepare(tiny_model, tmp_path / "cache", write_jsonl(tmp_path / "p.jsonl", records))
    assert 'a valid prompt record: {"prompt": "Name a colour: ", "answer": "blue"}' in str(info.value)


def test_prompts_are_not_packed(tiny_model: Path, tmp_path: Path):
    with pytest.raises(UserError, match="data.packing: prompts are not packed"):
        prepare(tiny_model, tmp_path / "cache", write_jsonl(tmp_path / "p.jsonl", RECORDS), packing=True)
