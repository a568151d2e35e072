"""KTO's KL pairs: each prompt of a set of rows with the next row's completion, and their summed log-ratio.

Rows are feedback rows (training/data/formats.py): prompt + completion in one sequence, labels on the
completion only, so the completion starts where the labels do. Pair j of rows r_0 … r_{n-1} is r_j's
prompt followed by r_{(j+1) mod n}'s completion, the tokens laid end to end as TRL lays them (its
`KL_completion_ids`: the batch's completions shifted by one). For a training step the rows are the
step's global order (StepBatch.rows), so the pairs are the same on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from training.data.packing import IGNORE_INDEX, MicroBatch, collate
from training.forward import run_forward


def prompt_length(labels: Sequence[int]) -> int:
    """Tokens before a row's completion: labels are shifted, so the first label is predicted at position p - 1."""
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return i + 1
    return len(labels)


def kl_pair(prompt_ids, prompt_labels, ids, labels, max_length: int) -> dict:
    """One row (a collate record): the first row's prompt, then the second row's completion, cut at max_length."""
    p, q = prompt_length(prompt_labels), prompt_length(labels)
    pair_ids = list(prompt_ids[:p]) + list(ids[q:])
    pair_labels = [IGNORE_INDEX] * (p - 1) + list(labels[q - 1 :])
    if len(pair_ids) > max_length:  # as TRL truncates its KL sequences to max_length
        pair_ids, pair_labels = pair_ids[:max_length], pair_labels[: max_length - 1] + [IGNORE_INDEX]
    return {"input_ids": pair_ids, "labels": pair_labels, "segment_lengths": [len(pair_ids)]}


def kl_micro_batches(
    dataset,
    rows: Sequence[int],
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    max_length: int,
    attention: str = "sdpa",
    pad_token_id: int = 0,
) -> Iterator[tuple[MicroBatch, bool]]:
    """(micro-batch, real) of this rank's share of the KL pairs of `rows`: chunks of ranks × micro batch in
    pair order, rank r's slice of each. Every rank gets as many micro-batches (a forward may be a
    collective); real is False for a throwaway repeat of pair 0 where a rank has none left."""
    rows = [int(r) for r in rows]
    n, chunk = len(rows), world_size * micro_batch_size
    columns = dataset.select_columns(["input_ids", "labels"])
    for start in range(0, n, chunk):
        mine = list(range(start, min(start + chunk, n)))[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        real = bool(mine)
        mine = mine or [0]
        prompts = columns[[rows[j] for j in mine]]
        answers = columns[[rows[(j + 1) % n] for j in mine]]
        records = [
            kl_pair(pi, pl, ai, al, max_length)
            for pi, pl, ai, al in zip(
                prompts["input_ids"], prompts["labels"], answers["input_ids"], answers["labels"], strict=True
            )
        ]
        micro = collate(records, padding_free=True, attention=attention, pad_token_id=pad_token_id)
        yield micro, real


def kl_sum(
    strategy, micro_batches: Iterator[tuple[MicroBatch, bool]], logps: Callable[[torch.nn.Module, MicroBatch], torch.Tensor]
) -> torch.Tensor:
    """Σ of `logps` (per pair) over every rank's real pairs, without gradients: a 0-d fp64 tensor on every rank."""
    total = torch.zeros((), dtype=torch.float64, device=strategy.env.device)
    with torch.no_grad():
        for micro, real in micro_batches:
            values = run_forward(strategy, logps, micro)
            if real:
                total += values.double().sum()
    return strategy.all_reduce_sum(total)
