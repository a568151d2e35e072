"""Sequence parallelism in one process: a micro-batch cut into chunks (training/data/sequence_chunks.py), and
what a job must be for its rows to split, refused before launch through `sharpen plan` (launcher/spec.py's
rules and launcher/sequence_rules.py) with one message and exit 2. The split training itself runs on real
ranks in tests/ranks/test_sequence_parallel.py."""

from __future__ import annotations

import json

import pytest
import torch
from support.e2e import ALPACA, base_job, write_job

from launcher.cli import main
from training.data.packing import IGNORE_INDEX, collate
from training.data.sequence_chunks import chunk_micro_batch, sample_lengths
from training.kernels.attention import PER_SAMPLE_SDPA
from training.kernels.sequence_parallel import SequenceGroup

SHAPE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def micro_of(lengths: list[int]):
    ids = list(range(10, 10 + sum(lengths)))
    labels = [IGNORE_INDEX if i % 3 == 0 else t + 1 for i, t in enumerate(ids)]
    return collate([{"input_ids": ids, "labels": labels, "segment_lengths": lengths}], attention=PER_SAMPLE_SDPA)


def test_chunks_cover_the_row_with_its_positions_labels_and_samples():
    micro = micro_of([5, 8, 4])  # 17 tokens: a pad token makes two chunks of 9
    chunks = [chunk_micro_batch(micro, SequenceGroup(2, i), pad_token_id=0) for i in (0, 1)]
    assert [c.input_ids.shape[1] for c in chunks] == [9, 9]
    assert torch.cat([c.input_ids for c in chunks], dim=1)[0].tolist() == micro.input_ids[0].tolist() + [0]
    assert torch.cat([c.position_ids for c in chunks], dim=1)[0].tolist() == [0, 1, 2, 3, 4, *range(8), 0, 1, 2, 3, 0]
    labels = torch.cat([c.labels for c in chunks], dim=1)[0].tolist()
    assert labels == micro.labels[0].tolist() + [IGNORE_INDEX]
    assert sum(c.num_label_tokens for c in chunks) == micro.num_label_tokens
    assert [c.num_tokens for c in chunks] == [9, 8]  # the pad token is not a token of the data
    for c in chunks:
        assert c.attention_mask is None and c.segments.lengths == (5, 8, 4, 1) and c.segments.chunk == 9
        assert c.label_columns.tolist() == (c.labels[0] != IGNORE_INDEX).nonzero().flatten().tolist()
    even = chunk_micro_batch(micro_of([6, 6]), SequenceGroup(4, 3))
    assert even.segments.lengths == (6, 6) and even.position_ids[0].tolist() == [3, 4, 5]


def test_sample_lengths_follow_the_position_resets():
    assert sample_lengths(micro_of([3, 1, 7]).position_ids) == [3, 1, 7]
    with pytest.raises(ValueError, match="one padding-free row"):
        chunk_micro_batch(collate([{"input_ids": [1, 2], "labels": [2, -100], "segment_lengths": [2]},
                                   {"input_ids": [3], "labels": [-100], "segment_lengths": [1]}],
                                  padding_free=False), SequenceGroup(2, 0))


def config_dir(tmp_path, config_class: str = "LlamaConfig", **fields):
    import transformers

    out = tmp_path / f"{config_class}-{len(list(tmp_path.glob('*Config*')))}"
    getattr(transformers, config_class)(**{**SHAPE, **fields}).save_pretrained(out)
    return out


def plan(tmp_path, model_dir, capsys, degree: int = 2, *flags: str, **sections) -> tuple[int, str]:
    job = base_job(model_dir, ALPACA, **{
        "strategy": {"name": "fsdp", "sequence_parallel": degree}, "resources": {"gpus_per_node": 2},
        "data": {"max_length": 64}, **sections,
    })
    run_dir = tmp_path / "run"
    path = write_job(tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml", job)
    capsys.readouterr()
    code = main(["plan", str(path), "--output-dir", str(run_dir), *flags])
    captured = capsys.readouterr()
    return code, captured.out if flags else captured.err


def refused(tmp_path, model_dir, capsys, degree: int = 2, **sections) -> str:
    code, err = plan(tmp_path, model_dir, capsys, degree, **sections)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    return err


def test_a_split_job_plans_its_groups_and_accumulation(tmp_path, capsys):
    code, out = plan(tmp_path, config_dir(tmp_path), capsys, 2, "--json")
    assert code == 0, out
    written = json.loads(out)
    # 8 rows a step over one data-parallel group of 2 ranks, 2 rows a micro-step: 4 micro-steps
    assert (written["sequence_parallel"], written["micro_batch_size"], written["grad_accum"]) == (2, 2, 4)


def test_what_cannot_split_is_refused_with_the_fix(tmp_path, capsys):
    model = config_dir(tmp_path)
    err = refused(tmp_path, model, capsys, degree=3)
    assert "strategy.sequence_parallel: 3 does not divide the 2 ranks (resources.nodes x gpus_per_node)" in err
    assert "try 1 or 2" in err
    err = refused(tmp_path, model, capsys, data={"max_length": 64, "padding_free": False})
    assert "data.padding_free: false, but strategy.sequence_parallel 2 splits each row's tokens over 2 ranks" in err
    err = refused(tmp_path, model, capsys, model={"path": str(model), "attention": "eager"})
    assert "model.attention: eager, but strategy.sequence_parallel 2" in err and "set model.attention: sdpa" in err
    err = refused(tmp_path, model, capsys, method={"kind": "dpo"},
                  data={"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_length": 64})
    assert "method.kind dpo cannot split its rows yet (sequence parallelism trains sft or pretrain); set it to 1" in err
    err = refused(tmp_path, model, capsys, train={"micro_batch_size": 3, "global_batch_size": 8, "max_steps": 2})
    assert "train.global_batch_size: 8 is not divisible by train.micro_batch_size x data-parallel groups" in err


def test_heads_that_do_not_divide_and_experts_are_refused(tmp_path, capsys):
    err = refused(tmp_path, config_dir(tmp_path, num_attention_heads=3, num_key_value_heads=1, hidden_size=48),
                  capsys)
    assert "the model's 3 attention heads do not divide among 2 ranks" in err and "set it to 1" in err
    moe = config_dir(tmp_path, "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    err = refused(tmp_path, moe, capsys)
    assert "routes tokens to experts" in err


def test_key_value_heads_that_do_not_divide_are_repeated_and_said(tmp_path, capsys):
    code, err = plan(tmp_path, config_dir(tmp_path, num_key_value_heads=1), capsys)
    assert code == 0, err
    assert "the model's 1 key/value heads do not divide among 2 ranks, so they are repeated to its 4 query heads" in err


def test_a_window_under_sequence_parallelism_plans_on_cuda(tmp_path, capsys):
    """Split rows run the per-sample kernel on any device, which keeps each sample's window: a Mistral window
    shorter than the samples, refused for sdpa's block mask on CUDA, plans when the rows are split."""
    mistral = config_dir(tmp_path, "MistralConfig", sliding_window=16)
    sections = {"device": "cuda", "resources": {"gpus_per_node": 2, "gpu_memory_gb": 80},
                "cluster": {"kind": "slurm"}}
    assert plan(tmp_path, mistral, capsys, degree=1, **sections)[0] == 2
    code, err = plan(tmp_path, mistral, capsys, degree=2, **sections)
    assert code == 0, err
