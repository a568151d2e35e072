"""Sequence parallelism (strategy.sequence_parallel) gives the losses of the unsplit rows.

One spawn of two real ranks on gloo runs each job twice: with sequence_parallel 1 (two data-parallel ranks,
each its own rows) and 2 (one group: every row cut in two, each rank a chunk, attention over the whole row
through the all-to-alls). What runs is what the worker runs: the rows of a step from the sampler
(training/data/sampler.py, with the worker's `row_split`), padding-free rows of several samples each, whose
lengths leave some rows odd (a pad sample evens them), the model with sdpa per sample and the kernel levers
`training.kernels.apply` installs, the causal_lm loss, the strategy's accumulate/backward/step, and an
evaluation through training/evaluate.py. Families: Llama (4 query heads, 2 KV heads: both split), a Llama
with 1 KV head (repeated to the query heads first), Gemma 3 (a sliding window of 8 tokens, shorter than the
samples, across the chunk boundary; tied embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from support import dist_harness

STEPS = 3
ROWS = 12
GLOBAL_BATCH = 4
LR = 3e-3
RTOL = 1e-4


@dataclass(frozen=True)
class Job:
    family: str
    strategy: str
    finetune: str  # full | lora
    sequence_parallel: int
    checkpointing: str = "none"  # model.gradient_checkpointing: the recompute runs the all-to-alls again


def rows_of(vocab: int, seed: int, count: int) -> list[dict]:
    """Stored rows as the cache holds them: 2-4 samples laid end to end, labels shifted, some masked."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        lengths = torch.randint(9, 30, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        ids, labels = [], []
        for n in lengths:
            sample = torch.randint(10, vocab, (n,), generator=gen)
            target = torch.cat([sample[1:], torch.tensor([-100])])
            target[torch.rand(n, generator=gen) < 0.3] = -100
            target[0] = sample[1]
            ids += sample.tolist()
            labels += target.tolist()
        rows.append({
            "input_ids": ids, "labels": labels, "segment_lengths": lengths, "length": len(ids),
            "num_label_tokens": sum(1 for x in labels if x != -100), "num_segments": len(lengths),
        })
    return rows


def dataset_of(rows: list[dict]):
    import datasets

    from training.data.packing import row_features

    return datasets.Dataset.from_list(rows, features=row_features())


def run_job(env, job: Job, model_dirs: dict[str, str]) -> dict:
    from support.strategy_model import build_model

    from launcher.plan import Plan
    from strategies import create_strategy
    from strategies.base import StrategyOptions
    from training import kernels
    from training.data.sampler import step_batches
    from training.evaluate import evaluate
    from training.forward import run_forward
    from training.kernels.attention import PER_SAMPLE_SDPA, kernel_name
    from training.methods.causal_lm import CausalLMLoss
    from training.worker import row_split

    plan = Plan.model_construct(sequence_parallel=job.sequence_parallel)
    split = row_split(plan, env, pad_token_id=0)
    data_ranks = split["world_size"]
    accum = GLOBAL_BATCH // data_ranks
    options = StrategyOptions(compute_dtype=torch.float32, micro_batch_size=1, gradient_accumulation_steps=accum,
                              max_grad_norm=1.0, gradient_checkpointing=job.checkpointing)
    strategy = create_strategy(job.strategy, options, env)
    model = build_model(model_dirs[job.family], job.finetune, kernel_name("sdpa"))
    model.train()
    levers = kernels.apply(model, strategy, compiled=False)
    strategy.setup(model, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0),
                   lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    vocab = strategy.unwrap().config.vocab_size
    train, held_out = dataset_of(rows_of(vocab, 1, ROWS)), dataset_of(rows_of(vocab, 2, 3))
    batches = step_batches(train, global_batch_size=GLOBAL_BATCH, micro_batch_size=1, grad_accum=accum, seed=7,
                           attention=PER_SAMPLE_SDPA, **split)
    loss_fn = CausalLMLoss()
    out: dict = {"losses": [], "levers": levers, "chunk_tokens": []}
    if split["split_row"] is not None:  # this rank's chunk of a row against the whole row's logits
        out["chunk_logits_error"] = chunk_logits_error(strategy, held_out, split["split_row"])
    for _ in range(STEPS):
        step = next(batches)
        total = torch.zeros((), dtype=torch.float64)
        for i, micro in enumerate(step.micro_batches):
            out["chunk_tokens"].append(micro.input_ids.shape[1])
            with strategy.accumulate(i == len(step.micro_batches) - 1):
                result = run_forward(strategy, loss_fn, micro)
                strategy.backward(result.loss_sum * (env.world_size / step.global_label_tokens))
            total += result.loss_sum.detach().double()
        strategy.step()
        out["losses"].append(float(strategy.all_reduce_sum(total)) / step.global_label_tokens)
    out["eval_loss"] = evaluate(strategy, loss_fn, held_out, micro_batch_size=1, padding_free=True,
                                attention=PER_SAMPLE_SDPA, **split)["loss"]
    out["probe_logits"] = whole_row_logits(strategy, held_out)[0]
    strategy.teardown()
    return out


def whole_row_logits(strategy, dataset) -> tuple[torch.Tensor, object]:
    """The model's logits on the first row of `dataset`, unsplit (a collective under fsdp and zero3)."""
    from training.data.packing import collate
    from training.kernels.attention import PER_SAMPLE_SDPA

    micro = collate([dataset[0]], attention=PER_SAMPLE_SDPA)
    model = strategy.model
    model.eval()
    with torch.no_grad(), strategy.forward_context():
        logits = model(**micro.model_inputs()).logits.float()
    model.train()
    return logits, micro


def chunk_logits_error(strategy, dataset, split_row) -> float:
    """Largest difference between the logits of this rank's chunk of a row and the same tokens' logits when
    the whole row runs on one rank."""
    whole, micro = whole_row_logits(strategy, dataset)
    chunk = split_row(micro)
    model = strategy.model
    model.eval()
    with torch.no_grad(), strategy.forward_context():
        logits = model(**chunk.model_inputs()).logits.float()
    model.train()
    index = chunk.segments.group.index
    start = index * chunk.segments.chunk
    real = whole[:, start : start + chunk.segments.chunk]
    return float((logits[:, : real.shape[1]] - real).abs().max())


def run_jobs(env, jobs: dict[str, Job], model_dirs: dict[str, str]) -> dict:
    return dist_harness.run_each(env, jobs, lambda env, job: run_job(env, job, model_dirs))


CASES = [
    ("llama", "fsdp", "full"), ("llama", "fsdp", "lora"), ("llama", "zero3", "full"), ("llama", "zero3", "lora"),
    ("llama", "ddp", "full"), ("llama-kv1", "fsdp", "full"), ("gemma3", "fsdp", "lora"),
    ("llama", "zero3", "full", "full"),  # checkpointed layers: the recompute exchanges again in the backward
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    from training.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("sequence-parallel")
    dirs = {
        "llama": str(build_tiny_model(root / "llama", "llama", vocab_size=320)),
        "llama-kv1": str(build_tiny_model(root / "llama-kv1", "llama", vocab_size=320, num_kv_heads=1)),
        "gemma3": str(build_tiny_model(root / "gemma3", "gemma3", vocab_size=320)),
    }
    jobs = {f"{'-'.join(case)}-sp{n}": Job(*case[:3], n, *case[3:]) for case in CASES for n in (1, 2)}
    return dist_harness.unwrap(dist_harness.run(run_jobs, 2, jobs, dirs, timeout=900))


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_split_rows_train_to_the_losses_of_whole_rows(results, case):
    name = "-".join(case)
    whole = [dist_harness.job_result(results, f"{name}-sp1", rank) for rank in (0, 1)]
    split = [dist_harness.job_result(results, f"{name}-sp2", rank) for rank in (0, 1)]
    assert split[0]["losses"] == split[1]["losses"]  # one group: both ranks log the same step losses
    # Before training, each rank's chunk gives the logits its tokens have in the whole row (both chunks).
    assert max(split[0]["chunk_logits_error"], split[1]["chunk_logits_error"]) < 1e-5
    # The trained models are the same: the unsplit row's logits after the last step.
    torch.testing.assert_close(split[0]["probe_logits"], whole[0]["probe_logits"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(split[0]["losses"], whole[0]["losses"], rtol=RTOL, atol=0)
    torch.testing.assert_close(split[0]["eval_loss"], whole[0]["eval_loss"], rtol=RTOL, atol=0)
    assert whole[0]["losses"][-1] < whole[0]["losses"][0]  # it trains
    # Each rank ran half of every row (a pad token evens an odd one): the two ranks' chunks are the same size,
    # and together the whole rows of the step, which sequence_parallel 1 dealt out to the ranks whole.
    assert split[0]["chunk_tokens"] == split[1]["chunk_tokens"]
    assert 2 * sum(split[0]["chunk_tokens"]) - sum(whole[0]["chunk_tokens"] + whole[1]["chunk_tokens"]) in range(0, 2 * STEPS * GLOBAL_BATCH)
    assert split[0]["levers"] == whole[0]["levers"]


def test_a_split_run_resumes_with_another_degree_to_the_same_losses(tiny_model, tmp_path):
    """`sharpen run` with sequence_parallel 2 (fsdp, 2 ranks, padding-free rows of several samples); the same job
    at sequence_parallel 1, killed after step 3 and resumed from its step-2 checkpoint with
    `--set strategy.sequence_parallel=2`, ends with the same losses step for step."""
    from support.e2e import ALPACA, assert_ok, base_job, losses, sharpen, write_job

    from training.env_hooks import FAULT

    def job(degree: int) -> dict:
        return base_job(tiny_model, ALPACA, strategy={"name": "fsdp", "sequence_parallel": degree},
                        resources={"gpus_per_node": 2}, train={"max_steps": 4, "save_every": 2, "lr": 2e-3})

    split_dir = tmp_path / "split"
    result = sharpen("run", str(write_job(tmp_path / "split.yaml", job(2))), "--output-dir", str(split_dir))
    assert_ok(result)
    assert "each row split over 2 ranks (all-to-all around attention), 1 data-parallel group(s)" in result.stderr
    plan = json.loads((split_dir / "plan.json").read_text())
    assert (plan["sequence_parallel"], plan["grad_accum"], plan["micro_batch_size"]) == (2, 4, 2)

    crashed = tmp_path / "crashed"
    result = sharpen("run", str(write_job(tmp_path / "whole.yaml", job(1))), "--output-dir", str(crashed),
                     env={FAULT: "kill-after-step:3"})
    assert result.returncode == 1, result.stderr
    result = sharpen("resume", str(crashed), "--set", "strategy.sequence_parallel=2")
    assert_ok(result)
    assert "step 2" in result.stderr
    resumed, straight = losses(crashed), losses(split_dir)
    assert len(resumed) == len(straight) == 4
    torch.testing.assert_close(resumed, straight, rtol=RTOL, atol=0)
