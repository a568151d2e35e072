"""The data pipeline: templates and loss masks, sample isolation in packed rows, sampler invariants, cache."""

from __future__ import annotations

import json
from collections import Counter
from itertools import accumulate, pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import data_inputs
from support.data_inputs import ALPACA, EXAMPLES, prepared, write_jsonl

from launcher.errors import UserError
from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from training.data.packing import best_fit_decreasing, collate
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.tiny import CHAT_TEMPLATE

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
model_dir = data_inputs.model_dir


CHAT = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give the opposite.\nhot"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "Name the color.\nsky"},
    {"role": "assistant", "content": "The sky is blue."},
]}
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def label_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def check_shifted(row) -> None:
    """Every label is the next input token, and the last token of each segment has none."""
    ids, labels = row["input_ids"], row["labels"]
    assert all(label == ids[i + 1] for i, label in enumerate(labels) if label != -100)
    assert all(labels[end - 1] == -100 for end in accumulate(row["segment_lengths"]))


# ---------------------------------------------------------------- formats and loss masks


def test_alpaca_prompt_has_no_loss_and_completion_is_shifted(model_dir, tokenizer, tmp_path):
    ds = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert len(ds) == 3
    for record, row in zip(ALPACA, ds, strict=True):
        template = ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT
        prompt = template.format(**record)
        assert tokenizer.decode(row["input_ids"]) == f"<s>{prompt}{record['output']}</s>"
        assert label_text(tokenizer, row) == record["output"] + "</s>"
        check_shifted(row)
        first = next(i for i, t in enumerate(row["labels"]) if t != -100)
        assert tokenizer.decode(row["input_ids"][: first + 1]) == "<s>" + prompt  # last prompt token predicts
        assert all(t != -100 for t in row["labels"][first:-1])
        assert row["num_label_tokens"] == sum(t != -100 for t in row["labels"])

    everything = prepared(model_dir, tmp_path / "c", tmp_path / "a.jsonl", train_on="all")
    assert [r["num_label_tokens"] for r in everything] == [r["length"] - 1 for r in everything]


@pytest.mark.parametrize("template", ["prefix diff", "generation block"])
def test_chat_only_assistant_tokens_carry_loss(model_dir, tmp_path, template):
    from transformers import AutoTokenizer

    tok_dir = model_dir
    if template == "generation block":
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.chat_template = GENERATION_TEMPLATE
        tok_dir = tmp_path / "tok"
        tok.save_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "c.jsonl", [CHAT])), "format": "chat"}])
    row = C.load_prepared(D.prepare_dataset(spec, "sft", str(tok_dir), cache_root=tmp_path / "c"))[0]
    assert tokenizer.decode(row["input_ids"]) == "<s>" + tokenizer.apply_chat_template(CHAT["messages"], tokenize=False) + "</s>"
    assert label_text(tokenizer, row) == "cold<|end|>\nThe sky is blue.<|end|>\n</s>"
    check_shifted(row)
    # the header "<|assistant|>\n" is prompt: its last token predicts the first answer token
    first = next(i for i, t in enumerate(row["labels"]) if t != -100)
    assert tokenizer.decode(row["input_ids"][: first + 1]).endswith("hot<|end|>\n<|assistant|>\n")


def test_chat_template_that_rewrites_history_is_refused(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE.replace("message['content']", "(message['content'] if loop.last else '...')")
    tok.save_pretrained(tmp_path / "tok")
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "c.jsonl", [CHAT])), "format": "chat"}])
    with pytest.raises(UserError, match=r"c\.jsonl.*record 1 \(line 1\).*prefixes"):
        D.prepare_dataset(spec, "sft", str(tmp_path / "tok"), cache_root=tmp_path / "c")


def test_text_packing_keeps_every_token_and_isolates_segments(model_dir, tokenizer, tmp_path):
    path = EXAMPLES / "text_tiny.jsonl"
    plain = prepared(model_dir, tmp_path / "c", path, fmt="text", max_length=96)
    packed = prepared(model_dir, tmp_path / "c", path, fmt="text", max_length=96, packing=True)
    assert all(r["num_label_tokens"] == r["length"] - 1 for r in plain)  # text: every token but BOS is a target
    assert len(packed) < len(plain) / 2
    assert sum(packed["length"]) == sum(plain["length"])
    assert sum(packed["num_label_tokens"]) == sum(plain["num_label_tokens"])
    assert sum(packed["num_segments"]) == len(plain)
    for row in packed:
        assert row["length"] == sum(row["segment_lengths"]) == len(row["input_ids"]) <= 96
        check_shifted(row)
    segments = Counter(
        tuple(r["input_ids"][s:e]) for r in packed for s, e in pairwise([0, *accumulate(r["segment_lengths"])])
    )
    assert segments == Counter(map(tuple, plain["input_ids"]))


def test_best_fit_decreasing_is_tight_and_deterministic():
    import numpy as np

    lengths = np.array([5, 3, 8, 2, 7, 1, 4, 6])
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 4  # 36 tokens, optimal is 4 bins
    assert bins == best_fit_decreasing(lengths, 10)


def test_truncation_right_and_drop(model_dir, tmp_path):
    path, cache = EXAMPLES / "alpaca_tiny.jsonl", tmp_path / "c"
    full = prepared(model_dir, cache, path, max_length=512)
    right = prepared(model_dir, cache, path, max_length=48)
    drop = prepared(model_dir, cache, path, max_length=48, truncation="drop")
    longer = [row for row in full if row["length"] > 48]
    assert 0 < len(longer) < len(full) / 2
    assert max(right["length"]) == 48 and max(drop["length"]) <= 48
    assert len(drop) == len(full) - len(longer)
    stats = json.loads((Path(right.cache_files[0]["filename"]).parent / C.META_FILE).read_text())["stats"]
    assert stats["truncated"] == len(longer)
    assert len(right) == len(full) - stats["dropped_no_labels"]  # a prompt of 48+ tokens leaves nothing to learn
    cut = {tuple(r["input_ids"]): r for r in right if r["length"] == 48}
    for row in longer:
        if tuple(row["input_ids"][:48]) in cut:
            short = cut[tuple(row["input_ids"][:48])]
            assert short["labels"] == row["labels"][:47] + [-100]


# ---------------------------------------------------------------- packed rows are separate samples


def logits(model, mb):
    with torch.no_grad():
        return model(**mb.model_inputs()).logits


def load_with(model_dir, attention: str):
    """The tiny model under transformers' `attention`, or sharpen's per-sample sdpa for the job's `sdpa`."""
    from transformers import AutoModelForCausalLM

    kernel = kernel_name("sdpa") if attention == PER_SAMPLE_SDPA else attention
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=kernel).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager", PER_SAMPLE_SDPA])
def test_padding_free_row_equals_samples_run_alone(model_dir, tmp_path, attention):
    model = load_with(model_dir, attention)
    rows = list(prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    rows.append(rows[0])  # two samples of one length: the per-sample kernel runs them as one batched call
    packed = collate(rows, padding_free=True, attention=attention)
    assert packed.input_ids.shape == (1, sum(r["length"] for r in rows))
    if attention == PER_SAMPLE_SDPA:  # no [T, T] mask: the sample lengths instead
        assert packed.attention_mask is None and packed.segments.lengths == tuple(r["length"] for r in rows)
    else:
        assert packed.attention_mask.shape == (1, 1, packed.input_ids.shape[1], packed.input_ids.shape[1])
    together = logits(model, packed)[0]
    start = 0
    for row in rows:
        alone = logits(model, collate([row], attention=attention))[0]
        torch.testing.assert_close(together[start : start + row["length"]], alone, atol=1e-5, rtol=0)
        start += row["length"]
    # Without the block mask or segments, the later samples attend to the earlier ones (so the check above
    # can fail). With use_cache=False transformers would find the samples from position_ids; it makes a
    # cache by default, which turns that off.
    with torch.no_grad():
        unmasked = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits[0]
    assert (unmasked[rows[0]["length"]:] - together[rows[0]["length"]:]).abs().max() > 1e-2


@pytest.mark.parametrize("attention", ["sdpa", "eager", PER_SAMPLE_SDPA])
@pytest.mark.parametrize("packing", [False, True])
def test_padding_free_loss_equals_padded_loss(model_dir, tmp_path, attention, packing):
    model = load_with(model_dir, attention)
    ds = prepared(model_dir, tmp_path / "c", EXAMPLES / "alpaca_tiny.jsonl", max_length=96, packing=packing)
    rows = [r for r in ds if r["num_segments"] > 1][-5:] + [ds[0]] if packing else list(ds.select(range(6)))
    losses = []
    for padding_free in (True, False):
        mb = collate(rows, padding_free=padding_free, attention=attention, pad_token_id=0)
        out = logits(model, mb)
        per_token = F.cross_entropy(out.flatten(0, 1), mb.labels.flatten(), ignore_index=-100, reduction="none")
        losses.append(per_token[mb.labels.flatten() != -100])  # label tokens in the same order in both layouts
        assert mb.num_label_tokens == int((mb.labels != -100).sum()) == sum(r["num_label_tokens"] for r in rows)
    assert mb.input_ids.shape[0] == 6
    # padded rows: a 2D padding mask, or, for packed rows, a 4D block mask where padding is one more segment
    assert mb.attention_mask.dim() == (4 if packing else 2)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)  # every label token's loss
    # the summed loss (what the loop divides by global_label_tokens): equal up to fp32 summation order
    torch.testing.assert_close(losses[0].sum(), losses[1].sum(), atol=1e-5, rtol=1e-6)


def test_flash_attention_padding_free_has_no_mask(model_dir, tmp_path):
    rows = list(prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    mb = collate(rows, attention="flash_attention_2")
    assert mb.attention_mask is None
    assert mb.position_ids[0].tolist() == [p for r in rows for p in range(r["length"])]


def test_eager_mask_follows_the_compute_dtype(model_dir, tmp_path):
    rows = list(prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    mb = collate(rows, attention="eager")
    assert mb.attention_mask.dtype == torch.float32  # additive: eager adds a bool mask as 0/1 (no masking)
    half = mb.to("cpu", dtype=torch.bfloat16).attention_mask
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert torch.equal(half == 0, mb.attention_mask == 0)
    assert torch.equal(half == 0, collate(rows, attention="sdpa").attention_mask)


# ---------------------------------------------------------------- loading and bad input


def test_csv_parquet_and_directories_load_like_jsonl(model_dir, tmp_path):
    import pandas as pd

    base = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA))
    pd.DataFrame(ALPACA).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(ALPACA).to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.parquet"):
        assert prepared(model_dir, tmp_path / "c", tmp_path / name)["input_ids"] == base["input_ids"]
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "1.jsonl", ALPACA[:1])
    write_jsonl(tmp_path / "dir" / "2.jsonl", ALPACA[1:])
    assert prepared(model_dir, tmp_path / "c", tmp_path / "dir")["input_ids"] == base["input_ids"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"data.train\[0\] \(.*missing.jsonl\): file not found"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a",, "output": "b"}\n',
         r"bad.jsonl\): cannot read it: line 2: Expecting property name"),
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n{"instruction": "e"}\n',
         r"bad.jsonl\): record 3 \(line 4\): field 'output' is missing"),
        ('{"instruction": "a", "response": "b"}\n', r"bad.jsonl\): the records have no field 'output'"),
        ('{"instruction": "a", "output": 7}\n', r"record 1 \(line 1\): field 'output' must be a string, got int"),
    ],
)
def test_bad_input_is_one_clear_user_error(model_dir, tmp_path, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    spec = DataSpec(train=[{"path": str(path), "format": "alpaca"}])
    with pytest.raises(UserError, match=message) as err:
        D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c")
    if content is not None and "record" in message:
        assert '"instruction"' in str(err.value)  # shows what a valid record looks like


def test_nothing_left_after_tokenization_is_a_user_error(model_dir, tmp_path):
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "a.jsonl", ALPACA)), "format": "alpaca"}],
                    max_length=8, truncation="drop")
    with pytest.raises(UserError, match="no training samples left out of 3 records: 3 longer than"):
        D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c")
