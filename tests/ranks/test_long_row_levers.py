"""The two levers for long rows on real ranks (2 gloo ranks), against the same job without them: the fused
loss through a trained output projection (training/kernels/fused_loss.py; full fine-tuning, tied embeddings
included) under fsdp, zero2 and ddp, and offloaded activation checkpointing
(strategies/activation_checkpointing.py) under fsdp, full and LoRA.

What runs is what the worker runs for these jobs: the tiny model loaded with the per-sample sdpa kernel,
`training.kernels.apply` (or not), the causal_lm loss on padding-free micro-batches, the strategy's own
accumulate, backward and step. Every job in one spawn (process start-up dominates on 2 cores); the tests
compare the numbers it returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from support import dist_harness

STEPS = 3
SAMPLES_PER_STEP = 4  # 2 ranks: one micro-step of 2 samples each
LR = 3e-3
RTOL = 1e-5
FUSED_FAMILIES = ("llama", "qwen2")  # qwen2's tiny copy ties lm_head to embed_tokens
FUSED_STRATEGIES = ("fsdp", "zero2", "ddp")


@dataclass(frozen=True)
class Job:
    family: str
    strategy: str
    finetune: str = "full"  # full | lora
    kernels: bool = True  # training.kernels.apply, as the worker does
    checkpointing: str = "none"


def jobs() -> dict[str, Job]:
    out = {}
    for family in FUSED_FAMILIES:
        for strategy in FUSED_STRATEGIES:
            for kernels in (True, False):
                out[f"{family}-{strategy}-{'fused' if kernels else 'plain'}"] = Job(family, strategy, kernels=kernels)
    for finetune in ("full", "lora"):
        for mode in ("full", "offload"):
            out[f"llama-fsdp-{finetune}-{mode}"] = Job("llama", "fsdp", finetune, checkpointing=mode)
    return out


def step_samples(step: int, vocab: int) -> list[dict]:
    """The step's samples: the same random tokens every step (so the loss falls), ~30% of the labels masked,
    a different 30% each step."""
    gen, mask_gen = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200 + step)
    rows = []
    for _ in range(SAMPLES_PER_STEP):
        n = int(torch.randint(20, 60, (1,), generator=gen))
        ids = torch.randint(10, vocab, (n,), generator=gen)
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        labels[torch.rand(n, generator=mask_gen) < 0.3] = -100
        labels[0] = ids[1]
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "segment_lengths": [n]})
    return rows


def run_job(env, job: Job, model_dirs: dict[str, str]) -> dict:
    from support.strategy_model import build_model

    from strategies import create_strategy
    from strategies.base import StrategyOptions
    from training import kernels
    from training.data.packing import collate
    from training.forward import run_forward
    from training.kernels.attention import collate_attention, kernel_name
    from training.methods.causal_lm import CausalLMLoss

    gas = SAMPLES_PER_STEP // (2 * env.world_size)
    options = StrategyOptions(compute_dtype=torch.float32, micro_batch_size=1, gradient_accumulation_steps=gas,
                              max_grad_norm=1.0, gradient_checkpointing=job.checkpointing)
    strategy = create_strategy(job.strategy, options, env)
    model = build_model(model_dirs[job.family], job.finetune, kernel_name("sdpa"), lora_dropout=0.1)
    model.train()
    levers = kernels.apply(model, strategy, compiled=False) if job.kernels else []
    strategy.setup(model, lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    loss_fn, attention = CausalLMLoss(), collate_attention("sdpa", "cpu")
    vocab = strategy.unwrap().config.vocab_size
    out: dict = {"losses": [], "grad_norms": [], "levers": levers}
    per_rank = SAMPLES_PER_STEP // env.world_size
    for step in range(STEPS):
        rows = step_samples(step, vocab)
        global_labels = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
        mine = rows[env.rank * per_rank : (env.rank + 1) * per_rank]
        step_loss = torch.zeros((), dtype=torch.float64)
        for m in range(gas):
            micro = collate(mine[m * 2 : (m + 1) * 2], padding_free=True, attention=attention)
            with strategy.accumulate(m == gas - 1):
                torch.manual_seed(1000 * step + 10 * m + env.rank)  # LoRA's dropout masks
                result = run_forward(strategy, loss_fn, micro)
                strategy.backward(result.loss_sum * (env.world_size / global_labels))
            step_loss += result.loss_sum.detach().double()
        out["grad_norms"].append(float(strategy.step()))
        out["losses"].append(float(strategy.all_reduce_sum(step_loss)) / global_labels)
    strategy.teardown()
    return out


def run_jobs(env, jobs: dict[str, Job], model_dirs: dict[str, str]) -> dict:
    return dist_harness.run_each(env, jobs, lambda env, job: run_job(env, job, model_dirs))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    from training.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("long-row-levers")
    dirs = {family: str(build_tiny_model(root / family, family, vocab_size=320)) for family in FUSED_FAMILIES}
    return dist_harness.unwrap(dist_harness.run(run_jobs, 2, jobs(), dirs, timeout=900))


result = dist_harness.job_result


@pytest.mark.parametrize("strategy", FUSED_STRATEGIES)
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_the_fused_loss_of_a_trained_head_trains_as_the_plain_loss(two_ranks, family, strategy):
    """Full fine-tuning: the head's gradient, returned by the fused loss's autograd Function for a weight it
    reads without calling lm_head, reaches each strategy's gradient reduction (FSDP2's reduce-scatter of the
    root unit, DDP's buckets, ZeRO-2's hooks): the same losses and gradient norms step by step."""
    fused, plain = (result(two_ranks, f"{family}-{strategy}-{arm}") for arm in ("fused", "plain"))
    assert "fused_loss" in fused["levers"] and plain["levers"] == []
    assert plain["losses"][-1] < plain["losses"][0]  # it learns: equal losses mean equal updates
    assert fused["losses"] == pytest.approx(plain["losses"], rel=RTOL)
    assert fused["grad_norms"] == pytest.approx(plain["grad_norms"], rel=RTOL)
    for rank in (0, 1):  # every rank took the same steps
        assert result(two_ranks, f"{family}-{strategy}-fused", rank)["losses"] == fused["losses"]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_offloaded_checkpointing_trains_as_full_checkpointing_under_fsdp(two_ranks, finetune):
    full, offload = (result(two_ranks, f"llama-fsdp-{finetune}-{mode}") for mode in ("full", "offload"))
    assert full["losses"][-1] < full["losses"][0]
    assert offload["losses"] == full["losses"] and offload["grad_norms"] == full["grad_norms"]  # the same ops
