"""Data as users have it: the built-in chat templates and their loss masks, sharegpt, roles, columns,
train_on last_turn, tool calls and results, and the mistakes each of them is refused with."""

from __future__ import annotations

import json

import pytest
import yaml
from support import data_inputs
from support.chat_tokenizers import FAMILY_TOKENS, build_chat_tokenizer
from support.data_inputs import ALPACA, prepared, write_jsonl

from launcher.cli import main
from launcher.errors import UserError
from launcher.spec import CHAT_TEMPLATES, FORMAT_FIELDS, DataFile, DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.formats import FORMATS, Encoder, RecordError, encode_chat
from training.data.templates import HERE, load_chat_template

model_dir = data_inputs.model_dir

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give the opposite.\nhot"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "Name the color.\nsky"},
    {"role": "assistant", "content": "The sky is blue."},
]
# Each family's published format for CHAT, and the text of each assistant turn that carries loss: the
# answer and its end-of-turn token, never the header before it nor the newline after it.
RENDERED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGive the opposite.\nhot"
              "<|im_end|>\n<|im_start|>assistant\ncold<|im_end|>\n<|im_start|>user\nName the color.\nsky<|im_end|>\n"
              "<|im_start|>assistant\nThe sky is blue.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nGive the opposite.\nhot<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\ncold<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nName the color.\nsky<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nThe sky is blue.<|eot_id|>",
    "mistral": "<s>[INST] Give the opposite.\nhot[/INST] cold</s>"
               "[INST] You are a helpful assistant.\n\nName the color.\nsky[/INST] The sky is blue.</s>",
    "gemma": "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nGive the opposite.\nhot<end_of_turn>\n"
             "<start_of_turn>model\ncold<end_of_turn>\n<start_of_turn>user\nName the color.\nsky<end_of_turn>\n"
             "<start_of_turn>model\nThe sky is blue.<end_of_turn>\n",
    "phi3": "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nGive the opposite.\nhot<|end|>\n"
            "<|assistant|>\ncold<|end|>\n<|user|>\nName the color.\nsky<|end|>\n<|assistant|>\nThe sky is blue.<|end|>\n",
}
RENDERED["qwen"] = RENDERED["chatml"]
END_OF_TURN = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>",
               "gemma": "<end_of_turn>", "phi3": "<|end|>"}
ANSWER_PREFIX = {"mistral": " "}  # mistral's answer starts with a space after [/INST]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    """A base tokenizer (no chat template) per family, with that family's special tokens."""
    return {f: build_chat_tokenizer(tmp_path_factory.mktemp(f), f) for f in FAMILY_TOKENS}


def loss_runs(tokenizer, ids, targets) -> list[str]:
    """The decoded text of each run of consecutive target tokens."""
    runs, current = [], []
    for token, target in zip(ids, targets, strict=True):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in [*runs, current] if r]


def encode(tokenizer, family, messages, train_on="completion", tools=None):
    tokenizer.chat_template = load_chat_template(family)
    batch = {"messages": [messages]} | ({"tools": [tools]} if tools else {})
    ((ids, targets),) = encode_chat(batch, Encoder(tokenizer, train_on))
    return ids, targets


def test_the_builtins_are_the_template_files():
    assert sorted(p.stem for p in HERE.glob("*.jinja")) == sorted(CHAT_TEMPLATES)
    assert all("{%- generation %}" in load_chat_template(name) for name in CHAT_TEMPLATES)
    # one table of each format's fields: what a file must have is among what columns may map
    assert all(set(fmt.required(None)) <= set(FORMAT_FIELDS[name]) for name, fmt in FORMATS.items())


@pytest.mark.parametrize("family", CHAT_TEMPLATES)
def test_builtin_template_masks_are_exactly_the_assistant_turns(family_tokenizers, family):
    tok = family_tokenizers[family]
    ids, targets = encode(tok, family, CHAT)
    bos = FAMILY_TOKENS[family][0]
    added_bos = bos if bos and not RENDERED[family].startswith(bos) else ""  # Encoder.finish: BOS first, once
    added_eos = "" if RENDERED[family].endswith(tok.eos_token) else tok.eos_token  # and EOS last, once
    assert tok.decode(ids) == added_bos + RENDERED[family] + added_eos
    answer = [ANSWER_PREFIX.get(family, "") + a + END_OF_TURN[family] for a in ("cold", "The sky is blue.")]
    assert loss_runs(tok, ids, targets) == answer  # one token more or less on either side fails this
    ids, targets = encode(tok, family, CHAT, "last_turn")
    assert loss_runs(tok, ids, targets) == answer[1:]


@pytest.mark.parametrize("family", CHAT_TEMPLATES)
def test_the_rust_tokenizer_path_gives_the_wrappers_ids_and_masks(family_tokenizers, family):
    """Encoder calls the Rust tokenizer directly and masks with numpy (issue 18's speed); both must give
    exactly what transformers' call and a per-token overlap test give, special tokens and all."""
    tok = family_tokenizers[family]
    tok.chat_template = load_chat_template(family)
    chat = tok.apply_chat_template(CHAT, tokenize=False)
    texts = [chat, RENDERED[family], " héllo\n\n wörld ", ""]
    spans = [[(3, 40), (60, 61)], [(0, 1)], [(2, 9)], [(0, 0)]]
    every = [[(lo, lo + width)] for width in (0, 1, 3) for lo in range(len(chat))]  # every place of the chat
    texts, spans = texts + [chat] * len(every), spans + every
    enc = Encoder(tok, "completion")
    assert enc._backend() is not None
    wrapped = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    fast = enc.encode_spans(texts, spans)
    for (ids, targets), want_ids, offsets, text_spans in zip(
        fast, wrapped["input_ids"], wrapped["offset_mapping"], spans, strict=True
    ):
        want = [any(end > lo and start < hi for lo, hi in text_spans) for start, end in offsets]
        assert enc.finish(list(want_ids), want) == (ids, targets)
    tok.backend_tokenizer.enable_truncation(8)  # a state the wrapper would reset: the wrapper is used
    try:
        assert enc._backend() is None
        assert enc.encode_spans(texts[:1], spans[:1])[0][0] == fast[0][0]
    finally:
        tok.backend_tokenizer.no_truncation()


@pytest.mark.parametrize("family", ["chatml", "qwen", "llama3", "mistral"])
def test_tool_calls_are_trained_and_tool_results_never(family_tokenizers, family):
    tok = family_tokenizers[family]
    ids, targets = encode(tok, family, TOOL_CHAT, tools=TOOLS)
    text, runs = tok.decode(ids), loss_runs(tok, ids, targets)
    assert "get_weather" in text.split(runs[0])[0]  # the tool definitions are rendered, before any answer
    assert len(runs) == 2 and '"name": "get_weather"' in runs[0] and '"city": "Paris"' in runs[0]
    assert runs[1] == ANSWER_PREFIX.get(family, "") + "It is 21 degrees in Paris." + END_OF_TURN[family]
    assert '{"temperature": 21}' in text and not any("temperature" in r for r in runs)
    ids, targets = encode(tok, family, TOOL_CHAT, "last_turn", tools=TOOLS)
    assert loss_runs(tok, ids, targets) == runs[1:]


def test_a_template_without_tools_refuses_them(family_tokenizers):
    with pytest.raises(RecordError, match="cannot render this conversation: gemma: the template has no tool calls"):
        encode(family_tokenizers["gemma"], "gemma", TOOL_CHAT)


def test_a_base_model_trains_on_chat_with_model_chat_template(family_tokenizers, tmp_path):
    """The prepared row (shifted labels) of a base tokenizer given chatml: the answers and nothing else."""
    family_tokenizers["chatml"].chat_template = None
    tok_dir = tmp_path / "base"
    family_tokenizers["chatml"].save_pretrained(tok_dir)
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])), "format": "chat"}])
    with pytest.raises(UserError, match=r"c\.jsonl\): the tokenizer has no chat template .*set model\.chat_template"):
        D.prepare_dataset(spec, "sft", str(tok_dir), cache_root=tmp_path / "c")
    row = C.load_prepared(D.prepare_dataset(spec, "sft", str(tok_dir), cache_root=tmp_path / "c", chat_template="chatml"))[0]
    labels = [t for t in row["labels"] if t != -100]
    assert family_tokenizers["chatml"].decode(labels) == "cold<|im_end|>The sky is blue.<|im_end|>"
    other = D.prepare_dataset(spec, "sft", str(tok_dir), cache_root=tmp_path / "c", chat_template="phi3")
    assert C.load_prepared(other)[0]["input_ids"] != row["input_ids"]  # the template is part of the cache key


# ---------------------------------------------------------------- sharegpt and columns


def sharegpt(messages, keys=("from", "value")) -> list[dict]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{keys[0]: names[m["role"]], keys[1]: m["content"]} for m in messages]


def test_sharegpt_gives_the_native_chat_ids_and_masks(model_dir, tmp_path):
    native = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "n.jsonl", [{"messages": CHAT}] * 2), "chat")
    records = [
        {"conversations": sharegpt(CHAT)},
        {"conversations": sharegpt(CHAT[1:]), "system": CHAT[0]["content"]},  # the system prompt as a column
    ]
    shared = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "s.jsonl", records), "sharegpt")
    assert shared["input_ids"] == native["input_ids"] and shared["labels"] == native["labels"]
    mapped = [{"dialog": [{"speaker": "bot" if m["role"] == "assistant" else m["role"], "text": m["content"]}
                          for m in CHAT]}]
    path = write_jsonl(tmp_path / "r.jsonl", [{"conversations": [{"from": t["speaker"], "value": t["text"]}
                                                                for t in mapped[0]["dialog"]]}])
    spec = DataSpec(train=[{"path": str(path), "format": "sharegpt", "roles": {"bot": "assistant"}}])
    row = C.load_prepared(D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c"))[0]
    assert row["labels"] == native[0]["labels"]


def test_last_turn_trains_the_final_answer_only(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": CHAT}])
    every = prepared(model_dir, tmp_path / "c", path, "chat")[0]
    last = prepared(model_dir, tmp_path / "c", path, "chat", train_on="last_turn")[0]
    assert every["input_ids"] == last["input_ids"]
    first_answer = [i for i, (a, b) in enumerate(zip(every["labels"], last["labels"], strict=True)) if a != b]
    assert first_answer and all(last["labels"][i] == -100 for i in first_answer)
    assert last["num_label_tokens"] < every["num_label_tokens"]
    assert all(b in (a, -100) for a, b in zip(every["labels"], last["labels"], strict=True))


MAPPED = [
    ("alpaca", ALPACA, {"instruction": "question", "input": "context", "output": "answer"}),
    ("text", [{"text": "Some document text."}, {"text": "Another one."}], {"text": "body"}),
    ("preference", [{"prompt": "2+2? ", "chosen": "4", "rejected": "5"}], {"prompt": "q", "chosen": "good", "rejected": "bad"}),
    ("feedback", [{"prompt": "2+2? ", "completion": "4", "label": True}], {"completion": "reply", "label": "ok"}),
    ("prompt", [{"prompt": "Name a colour: ", "answer": "blue"}], {"prompt": "question"}),
]
KIND = {"text": "pretrain", "preference": "dpo", "feedback": "kto", "prompt": "grpo", "alpaca": "sft"}


@pytest.mark.parametrize("fmt, records, columns", MAPPED, ids=[m[0] for m in MAPPED])
def test_mapped_columns_give_the_native_rows(model_dir, tmp_path, fmt, records, columns):
    theirs = [{columns.get(k, k): v for k, v in r.items()} for r in records]
    if fmt == "alpaca":  # a column named like a mapped field, which columns: says is not that field
        theirs = [r | {"instruction": "a column columns: does not read"} for r in theirs]
    rows = []
    for path, mapping in ((write_jsonl(tmp_path / "native.jsonl", records), None),
                          (write_jsonl(tmp_path / "theirs.jsonl", theirs), columns)):
        spec = DataSpec(train=[{"path": str(path), "format": fmt, "columns": mapping}])
        rows.append(C.load_prepared(D.prepare_dataset(spec, KIND[fmt], str(model_dir), cache_root=tmp_path / "c")))
    assert rows[0]["input_ids"] == rows[1]["input_ids"]
    assert rows[0].column_names == rows[1].column_names
    for name in ("labels", "desirable", "columns"):
        if name in rows[0].column_names:
            assert rows[0][name] == rows[1][name]


def test_a_mapped_column_the_file_lacks_is_named(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "reply": "b"}])
    spec = DataSpec(train=[{"path": str(path), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}])
    with pytest.raises(UserError, match=r"qa\.jsonl\): columns maps output: 'answer', but the records have no such "
                                        r"column; their columns are question, reply"):
        D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c")
    with pytest.raises(ValueError, match="'question' is not a field of format alpaca"):
        DataFile(path="x.jsonl", columns={"question": "q"})


# ---------------------------------------------------------------- unknown roles, through the CLI


def job_file(tmp_path, model, data: dict, **model_keys) -> str:
    job = {"model": {"path": str(model), **model_keys}, "device": "cpu",
           "data": {"train": [data], "max_length": 128, "cache_dir": str(tmp_path / "cache")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return str(tmp_path / "job.yaml")


@pytest.mark.parametrize("fmt", ["chat", "sharegpt"])
def test_an_unknown_role_is_exit_2_naming_file_line_role_and_roles(model_dir, tmp_path, capsys, fmt):
    good = {"messages": CHAT[1:3]} if fmt == "chat" else {"conversations": sharegpt(CHAT[1:3])}
    bad = json.loads(json.dumps(good))
    turns = bad["messages"] if fmt == "chat" else bad["conversations"]
    turns[1]["role" if fmt == "chat" else "from"] = "bot"
    path = write_jsonl(tmp_path / "talk.jsonl", [good, good, bad])
    assert main(["preview", job_file(tmp_path, model_dir, {"path": str(path), "format": fmt})]) == 2
    err = capsys.readouterr().err
    allowed = "system, user, assistant, tool" if fmt == "chat" else "human, user, gpt, assistant, system, tool, function"
    assert f"talk.jsonl): record 3 (line 3): {'messages' if fmt == 'chat' else 'conversations'}[1] has the role 'bot'" in err
    assert f"roles this file may use ({allowed}" in err and "roles: {bot: user}" in err
    assert "Traceback" not in err


def test_a_base_model_without_chat_template_is_exit_2_naming_the_key(model_dir, family_tokenizers, tmp_path, capsys):
    family_tokenizers["chatml"].chat_template = None
    family_tokenizers["chatml"].save_pretrained(tmp_path / "base")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    job = job_file(tmp_path, model_dir, {"path": str(path), "format": "chat"}, tokenizer=str(tmp_path / "base"))
    assert main(["preview", job]) == 2
    err = capsys.readouterr().err
    assert "c.jsonl): the tokenizer has no chat template (a base model?): set model.chat_template to a built-in" in err
    assert main(["preview", job, "--set", "model.chat_template=chatml"]) == 0


def test_final_tokenizer_carries_the_template(model_dir, tmp_path):
    """write_final saves the job's tokenizer: with model.chat_template it renders as the data was rendered."""
    import torch
    from transformers import AutoTokenizer

    from launcher.spec import JobSpec
    from strategies.base import DistEnv, StrategyOptions
    from strategies.single import SingleStrategy
    from training.export import write_final
    from training.model import load_model, load_tokenizer

    data = {"train": [{"path": str(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])), "format": "chat"}]}
    spec = JobSpec.model_validate({"model": {"path": str(model_dir), "chat_template": "llama3"}, "data": data})
    strategy = SingleStrategy(StrategyOptions(), DistEnv())
    strategy.setup(load_model(spec, "fp32", torch.device("cpu")), lambda p: torch.optim.AdamW(p),
                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    write_final(strategy, load_tokenizer(spec), tmp_path / "final", peft=False)
    saved = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert saved.chat_template == load_chat_template("llama3")
    prompt = saved.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_preference_messages_take_the_roles_mapping(model_dir, tmp_path):
    def pair(user, bot):
        return {"prompt": [{"role": user, "content": "What is 2+2?"}], "chosen": [{"role": bot, "content": "4"}],
                "rejected": [{"role": bot, "content": "5"}]}

    native = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "n.jsonl", [pair("user", "assistant")]), "preference")
    path = write_jsonl(tmp_path / "t.jsonl", [pair("human", "bot")])
    spec = DataSpec(train=[{"path": str(path), "format": "preference"}])
    with pytest.raises(UserError, match=r"t\.jsonl\): record 1 \(line 1\): prompt\[0\] has the role 'human'"):
        D.prepare_dataset(spec, "dpo", str(model_dir), cache_root=tmp_path / "c")
    spec = DataSpec(train=[{"path": str(path), "format": "preference", "roles": {"human": "user", "bot": "assistant"}}])
    mapped = C.load_prepared(D.prepare_dataset(spec, "dpo", str(model_dir), cache_root=tmp_path / "c"))
    assert mapped["input_ids"] == native["input_ids"] and mapped["labels"] == native["labels"]


def test_a_run_tokenizes_with_the_jobs_template_from_a_path_beside_the_job(model_dir, family_tokenizers, tmp_path):
    """What `sharpen run` prepares (launcher/prepare.py) is rendered with model.chat_template, here a .jinja
    file named relative to the job file's directory rather than the working directory."""
    from pathlib import Path

    from launcher.jobfile import load_job
    from launcher.prepare import prepare_run

    family_tokenizers["chatml"].chat_template = None
    family_tokenizers["chatml"].save_pretrained(tmp_path / "base")
    (tmp_path / "mine.jinja").write_text((HERE / "chatml.jinja").read_text())
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    job = job_file(tmp_path, model_dir, {"path": str(path), "format": "chat"}, tokenizer=str(tmp_path / "base"),
                   chat_template="mine.jinja")
    spec = load_job(job, [])
    assert spec.model.chat_template == str(tmp_path / "mine.jinja")
    plan = prepare_run(spec, tmp_path / "run")
    row = C.load_prepared(Path(plan.data_cache))[0]
    labels = [t for t in row["labels"] if t != -100]
    assert family_tokenizers["chatml"].decode(labels) == "cold<|im_end|>The sky is blue.<|im_end|>"
