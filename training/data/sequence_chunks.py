"""A padding-free micro-batch cut into the contiguous chunks of sequence parallelism, one per rank of a group.

The row is padded to a multiple of the degree with one more sample of pad tokens and no labels (it attends to
itself only, and adds no loss), then rank i of the group keeps tokens [i * T/N, (i+1) * T/N): their ids,
their position ids (each sample's own, as in the unsplit row) and their labels (already shifted, so a chunk's
last label is the next chunk's first token: nothing crosses a boundary). The samples of the whole row travel
with the chunk (`ShardedSegments`) for the attention over the whole row (training/kernels/sequence_parallel.py).
The counts a loss is divided by stay the step's global ones (training/data/sampler.py), so the sum of every
rank's chunk losses over them is the unsplit loss.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from training.data.packing import IGNORE_INDEX, MicroBatch
from training.kernels.sequence_parallel import SequenceGroup, ShardedSegments


def sample_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the samples laid in a padding-free [1, T] row, from where its positions restart at 0."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        raise ValueError("a padding-free row's position ids start each sample at 0")
    return [b - a for a, b in zip(starts, [*starts[1:], position_ids.shape[1]], strict=True)]


def chunk_micro_batch(micro: MicroBatch, group: SequenceGroup, pad_token_id: int = 0) -> MicroBatch:
    """This rank's chunk of a padding-free micro-batch (its `group.index`-th of `group.degree`)."""
    if micro.input_ids.shape[0] != 1 or micro.padding_mask is not None:
        raise ValueError(f"sequence parallelism splits one padding-free row, not {tuple(micro.input_ids.shape)}")
    lengths = sample_lengths(micro.position_ids)
    n = group.degree
    total = sum(lengths)
    pad = -total % n
    ids, positions, labels = micro.input_ids, micro.position_ids, micro.labels
    if pad:
        lengths.append(pad)
        ids = torch.cat([ids, ids.new_full((1, pad), pad_token_id)], dim=1)
        positions = torch.cat([positions, torch.arange(pad, dtype=positions.dtype)[None]], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
    chunk = (total + pad) // n
    start, end = group.index * chunk, (group.index + 1) * chunk
    mine = labels[:, start:end]
    has_label = mine != IGNORE_INDEX
    return replace(
        micro,
        input_ids=ids[:, start:end],
        position_ids=positions[:, start:end],
        labels=mine,
        attention_mask=None,
        num_tokens=max(0, min(end, total) - start),
        num_label_tokens=int(has_label.sum()),
        segments=ShardedSegments(lengths, group),
        label_columns=has_label.any(dim=0).nonzero().flatten(),
    )
