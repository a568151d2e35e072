"""The data pipeline: templates and loss masks, sample isolation in packed rows, sampler invariants, cache."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter
from itertools import accumulate, pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.errors import UserError
from launcher.spec import DataSpec
from training.data import cache as C
from training.data import prepare as D
from training.data import sampler as S
from training.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from training.data.packing import best_fit_decreasing, collate
from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
from training.tiny import CHAT_TEMPLATE, build_tiny_llama, corpus_from_jsonl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
ALPACA = [
    {"instruction": "Add the two numbers.", "input": "3 and 4", "output": "7"},
    {"instruction": "Say hello to Ada.", "input": "", "output": "Hello, Ada!"},
    {"instruction": "Reverse the list.", "input": "cat, dog, owl", "output": "owl, dog, cat"},
]
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
def model_dir(tmp_path_factory) -> Path:
    corpus = [t for f in sorted(EXAMPLES.glob("*.jsonl")) for t in corpus_from_jsonl(f)]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), corpus=[ALPACA_PROMPT_WITH_INPUT] * 20 + corpus)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared(model_dir, cache, path, fmt="alpaca", train_on="completion", **data):
    spec = DataSpec(train=[{"path": str(path), "format": fmt}], **data)
    kind = "pretrain" if fmt == "text" else "sft"
    return C.load_prepared(D.prepare_dataset(spec, kind, str(model_dir), cache_root=cache, train_on=train_on))


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


# ---------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def alpaca_ds(model_dir, tmp_path_factory):
    return prepared(model_dir, tmp_path_factory.mktemp("cache"), EXAMPLES / "alpaca_tiny.jsonl", max_length=128)


def samples_of(step: S.StepBatch) -> list[tuple[int, ...]]:
    """The samples of a step batch, recovered from the rows by where position_ids restart."""
    out = []
    for mb in step.micro_batches:
        for ids, pos in zip(mb.input_ids.tolist(), mb.position_ids.tolist(), strict=True):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [tuple(ids[s:e]) for s, e in pairwise(starts)]
    return out


def global_batches(ds, world_size, grad_accum, steps, global_batch_size=8, **kw):
    micro = global_batch_size // (world_size * grad_accum)
    ranks = [
        S.step_batches(ds, global_batch_size=global_batch_size, micro_batch_size=micro, grad_accum=grad_accum,
                       rank=r, world_size=world_size, seed=3, **kw)
        for r in range(world_size)
    ]
    for _ in range(steps):
        parts = [next(it) for it in ranks]
        assert len({(p.global_label_tokens, p.global_tokens, p.global_samples, p.epoch) for p in parts}) == 1
        assert all(len(p.micro_batches) == grad_accum for p in parts)
        yield Counter(s for p in parts for s in samples_of(p)), parts[0]


def test_global_batches_are_world_size_invariant(alpaca_ds):
    runs = [list(global_batches(alpaca_ds, w, a, steps=6)) for w, a in [(1, 4), (2, 2), (4, 1)]]
    for k in range(6):
        assert runs[0][k][0] == runs[1][k][0] == runs[2][k][0]
        assert sum(runs[0][k][0].values()) == 8
        counts = {(r[k][1].global_label_tokens, r[k][1].global_tokens, r[k][1].global_samples) for r in runs}
        assert len(counts) == 1
    label_tokens = sum(
        mb.num_label_tokens for p in [runs[1][0][1]] for mb in p.micro_batches
    )
    assert 0 < label_tokens < runs[1][0][1].global_label_tokens  # one rank holds part of the step's labels


def test_epochs_cover_each_row_once_and_drop_the_partial_batch(model_dir, tmp_path):
    ds = prepared(model_dir, tmp_path / "c", EXAMPLES / "alpaca_tiny.jsonl").select(range(20))
    batches = list(global_batches(ds, 2, 1, steps=4, global_batch_size=8))
    assert [b.epoch for _, b in batches] == [0, 0, 1, 1]  # 20 rows: 2 steps per epoch, 4 rows left out
    epoch0 = batches[0][0] + batches[1][0]
    assert sum(epoch0.values()) == 16 and epoch0 <= Counter(map(tuple, ds["input_ids"]))
    assert batches[2][0] + batches[3][0] != epoch0  # a new permutation


def test_start_step_resumes_exactly(alpaca_ds):
    ds = alpaca_ds.select(range(100))  # 6 steps per epoch
    kw = dict(global_batch_size=16, micro_batch_size=4, grad_accum=2, rank=1, world_size=2, seed=7)
    start = 4  # the resumed range crosses an epoch boundary
    stream = S.step_batches(ds, **kw)
    for _ in range(start):
        next(stream)
    resumed = S.step_batches(ds, start_step=start, **kw)
    for _ in range(4):
        a, b = next(stream), next(resumed)
        assert (a.epoch, a.step, a.global_label_tokens, a.global_tokens) == (b.epoch, b.step, b.global_label_tokens, b.global_tokens)
        for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
            for name in ("input_ids", "position_ids", "labels", "attention_mask"):
                assert torch.equal(getattr(x, name), getattr(y, name))
    assert b.epoch == 1


def test_too_few_rows_for_one_global_batch(model_dir, tmp_path):
    ds = prepared(model_dir, tmp_path / "c", write_jsonl(tmp_path / "a.jsonl", ALPACA))
    with pytest.raises(UserError, match="3 rows, fewer than train.global_batch_size"):
        next(S.step_batches(ds, global_batch_size=4, micro_batch_size=1, grad_accum=4, rank=0, world_size=1, seed=0))


# ---------------------------------------------------------------- cache


def test_second_call_hits_the_cache(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    spec = DataSpec(train=[{"path": str(path), "format": "alpaca"}])
    before = C.builds_in_this_process
    first = D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c")
    stamp = (first / C.META_FILE).stat().st_mtime_ns
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c") == first
    assert C.builds_in_this_process == before + 1 and (first / C.META_FILE).stat().st_mtime_ns == stamp
    write_jsonl(path, ALPACA[:2])  # new contents: a new key
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c") != first
    longer = spec.model_copy(update={"max_length": 4096})
    assert D.prepare_dataset(longer, "sft", str(model_dir), cache_root=tmp_path / "c") != first
    assert C.builds_in_this_process == before + 3
    assert all(len(p.name) == 24 for p in (tmp_path / "c").iterdir())  # no lock, error or temp dir left


def _prepare_in_child(barrier, spec_json, model_dir, cache, results):
    from launcher.spec import DataSpec
    from training.data import cache as C
    from training.data import prepare as D

    barrier.wait()
    path = D.prepare_dataset(DataSpec.model_validate_json(spec_json), "sft", model_dir, cache_root=cache)
    results.put((str(path), C.builds_in_this_process))


def test_concurrent_processes_build_one_cache(model_dir, tmp_path):
    spec = DataSpec(train=[{"path": str(EXAMPLES / "alpaca_tiny.jsonl"), "format": "alpaca"}], max_length=100)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (barrier, spec.model_dump_json(), str(model_dir), str(tmp_path / "c"), results)
    procs = [ctx.Process(target=_prepare_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcome[0][0] == outcome[1][0]
    assert sorted(builds for _, builds in outcome) == [0, 1]
    assert [p.name for p in (tmp_path / "c").iterdir()] == [Path(outcome[0][0]).name]


def test_lock_of_a_dead_builder_is_broken(model_dir, tmp_path):
    spec = DataSpec(train=[{"path": str(write_jsonl(tmp_path / "a.jsonl", ALPACA)), "format": "alpaca"}])
    key = C.cache_key(spec, "sft", str(model_dir), "completion", False)
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"{key}.lock").write_text(f"{os.uname().nodename} {dead.pid}\n")
    assert D.prepare_dataset(spec, "sft", str(model_dir), cache_root=tmp_path / "c").name == key


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
