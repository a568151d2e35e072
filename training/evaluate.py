"""Evaluation of every method on held-out rows: the method's own loss and metrics, on all ranks.

The evaluation rows (data.eval files and the data.eval_split share of train, written by
training/data/prepare.py into the cache's eval/ directory) are cut into chunks of ranks × micro batch, in
row order; rank r takes its slice of each chunk. Each rank's sums are all-reduced and divided by the
whole set's count (label tokens for SFT, pairs for the preference methods and reward models): the same
number on any number of ranks. Ranks left without rows in the last chunk run one throwaway forward,
because under FSDP and ZeRO-3 a forward is a collective that every rank must join.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from strategies.base import Strategy
from training import heartbeat
from training.data.packing import MicroBatch, collate
from training.forward import run_forward

log = logging.getLogger("sharpen")


def shard_micro_batches(
    dataset,
    rows: Sequence[int],
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    padding_free: bool = True,
    attention: str = "sdpa",
    pad_token_id: int = 0,
    row_offset: int = 0,
    split_row: Callable[[MicroBatch], MicroBatch] | None = None,
) -> Iterator[tuple[MicroBatch, bool]]:
    """(micro-batch, real) for this rank over `rows`; every rank gets the same number of micro-batches.

    row_ids of each micro-batch are the dataset rows plus `row_offset` (keys of per-row tables that
    hold train and eval rows in one index space). real is False for a throwaway repeat of rows[0]."""
    rows = [int(r) for r in rows]
    columns = dataset.select_columns(["input_ids", "labels", "segment_lengths"])
    chunk = world_size * micro_batch_size
    for start in range(0, len(rows), chunk):
        mine = rows[start : start + chunk][rank * micro_batch_size : (rank + 1) * micro_batch_size]
        real = bool(mine)
        mine = mine or rows[:1]
        fetched = columns[mine]
        records = [dict(zip(fetched, values, strict=True)) for values in zip(*fetched.values(), strict=True)]
        micro = collate(records, padding_free=padding_free, attention=attention, pad_token_id=pad_token_id)
        micro.row_ids = [r + row_offset for r in mine]
        yield (micro if split_row is None else split_row(micro)), real


def dataset_counts(dataset) -> dict[str, int]:
    """The StepBatch counts of a whole dataset, so a method's `normaliser` names its denominator here too."""
    columns = dataset.with_format("arrow")
    total = {
        name: int(np.asarray(columns[name]).astype(np.int64).sum())
        for name in ("length", "num_label_tokens", "num_segments")
    }
    return {
        "global_label_tokens": total["num_label_tokens"],
        "global_tokens": total["length"],
        "global_samples": total["num_segments"],
        "global_rows": len(dataset),
    }


def evaluate(strategy: Strategy, method, dataset, **batching) -> dict[str, float]:
    """`method`'s mean loss and metrics over `dataset` (every rank calls it): {"loss": ..., name: ...}.

    The model runs in eval mode (no dropout, so no random numbers are drawn and training after an
    evaluation is the same as without one) and without gradients."""
    env, model = strategy.env, strategy.model
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prepare = getattr(method, "prepare_evaluation", None)  # a method that needs the whole set first (KTO)
            if prepare is not None:
                prepare(strategy, dataset, **batching)
            # data-parallel rank and size: with sequence parallelism, the group's (training/worker.py)
            ranks = {"rank": env.rank, "world_size": env.world_size, **batching}
            for micro, real in shard_micro_batches(dataset, range(len(dataset)), **ranks):
                heartbeat.beat()
                out = run_forward(strategy, method, micro)
                for name, value in {"loss": out.loss_sum, **out.metric_sums}.items():
                    # A throwaway batch adds zero, so every rank holds the same names for the all-reduce.
                    sums[name] = sums.get(name, 0) + value.detach().double() * float(real)
    finally:
        model.train(was_training)
    names = sorted(sums)
    totals = strategy.all_reduce_sum(
        torch.stack([torch.as_tensor(sums[n], device=env.device) for n in names])
    )
    denominator = dataset_counts(dataset)[method.normaliser]
    return {name: float(value) / denominator for name, value in zip(names, totals.tolist(), strict=True)}


class Evaluator:
    """The loop's evaluation hook: every `every` steps and at the last, one metrics row of eval/ names.

    SFT and pretraining (a loss per label token) also get eval/perplexity = exp(eval/loss)."""

    def __init__(self, strategy: Strategy, method, dataset, every: int, max_steps: int, **batching):
        self.strategy, self.method, self.dataset = strategy, method, dataset
        self.every, self.max_steps, self.batching = every, max_steps, batching

    def __call__(self, step: int) -> dict | None:
        if not self.every or (step % self.every and step != self.max_steps):
            return None
        result = evaluate(self.strategy, self.method, self.dataset, **self.batching)
        row = {"step": step, **{f"eval/{name}": value for name, value in result.items()}}
        if self.method.normaliser == "global_label_tokens":
            row["eval/perplexity"] = math.exp(min(result["loss"], 700.0))
        log.info(
            "eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
        )
        return row
