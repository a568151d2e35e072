"""World-size invariant sampling: global batch k holds the same samples whatever the ranks and accumulation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from launcher.errors import UserError
from training.data.packing import MicroBatch, collate


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and the counts of the whole step (every rank).

    global_samples counts original samples (a packed row holds several); step is the global step index.
    global_rows counts stored rows: a preference row is one (chosen, rejected) pair. rows are the step's
    stored rows on every rank, in the order that makes the step (KTO pairs neighbours in it).
    """

    micro_batches: list[MicroBatch]
    global_label_tokens: int
    global_tokens: int
    global_samples: int
    epoch: int
    step: int = 0
    global_rows: int = 0
    rows: np.ndarray | None = None


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of rows in `epoch`: a permutation seeded by (seed, epoch), the same on every rank."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed % (1 << 63), epoch]).permutation(num_rows)


def deal(
    members: np.ndarray, lengths: np.ndarray, grad_accum: int, world_size: int, micro_batch_size: int
) -> list[list[list[int]]]:
    """Slots [micro_step][rank] of one global batch: longest first, snake-dealt across ranks.

    Each micro step holds samples of similar length (ranks wait for each other at every micro step, and
    padded rows waste less) and the snake order evens out each rank's token count within it.
    """
    order = sorted((int(i) for i in members), key=lambda i: (-int(lengths[i]), i))
    slots: list[list[list[int]]] = [[[] for _ in range(world_size)] for _ in range(grad_accum)]
    for pos, index in enumerate(order):
        step, within = divmod(pos, world_size * micro_batch_size)
        lap, col = divmod(within, world_size)
        slots[step][col if lap % 2 == 0 else world_size - 1 - col].append(index)
    return slots


def step_batches(
    dataset,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    grad_accum: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool = True,
    padding_free: bool = True,
    attention: str = "sdpa",
    start_step: int = 0,
    pad_token_id: int = 0,
) -> Iterator[StepBatch]:
    """This rank's StepBatch for steps start_step, start_step + 1, ... over endless epochs.

    Global batch k is rows order[e][j*G:(j+1)*G] (e, j = divmod(k, rows // G)) whatever the world size
    and accumulation; the global counts come from stored per-row counts, so no collective is needed.
    """
    if micro_batch_size * grad_accum * world_size != global_batch_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} != micro_batch_size {micro_batch_size} x "
            f"grad_accum {grad_accum} x world_size {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    columns = dataset.with_format("arrow")
    lengths, label_counts, segment_counts = (
        np.asarray(columns[c]).astype(np.int64) for c in ("length", "num_label_tokens", "num_segments")
    )
    steps_per_epoch = len(lengths) // global_batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training data has {len(lengths)} rows, fewer than train.global_batch_size ({global_batch_size})",
            hint="lower train.global_batch_size, add data, or turn data.packing off",
        )
    rows_of = dataset.select_columns(["input_ids", "labels", "segment_lengths"])
    order, order_epoch = None, -1
    for step in range(start_step, 1 << 62):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(lengths), seed, epoch, shuffle), epoch
        members = order[position * global_batch_size : (position + 1) * global_batch_size]
        mine = [slot[rank] for slot in deal(members, lengths, grad_accum, world_size, micro_batch_size)]
        fetched = rows_of[[i for slot in mine for i in slot]]
        rows = [dict(zip(fetched, values, strict=True)) for values in zip(*fetched.values(), strict=True)]
        micro_batches = [
            collate(rows[k * micro_batch_size : (k + 1) * micro_batch_size],
                    padding_free=padding_free, attention=attention, pad_token_id=pad_token_id)
            for k in range(grad_accum)
        ]
        for micro, slot in zip(micro_batches, mine, strict=True):
            micro.row_ids = slot
        yield StepBatch(
            micro_batches=micro_batches,
            global_label_tokens=int(label_counts[members].sum()),
            global_tokens=int(lengths[members].sum()),
            global_samples=int(segment_counts[members].sum()),
            epoch=epoch,
            step=step,
            global_rows=len(members),
            rows=members,
        )


def step_prompts(num_rows: int, prompts_per_step: int, seed: int, shuffle: bool, step: int) -> tuple[int, np.ndarray]:
    """(epoch, rows) of the prompts of generation batch `step` (grpo): the same on every rank and world
    size, over endless epochs of `epoch_order`, as `step_batches` reads stored rows."""
    steps_per_epoch = num_rows // prompts_per_step
    if steps_per_epoch == 0:
        raise UserError(
            f"the training data has {num_rows} prompts, fewer than the {prompts_per_step} one step needs "
            "(train.global_batch_size / method.num_generations)",
            hint="lower train.global_batch_size, raise method.num_generations, or add prompts",
        )
    epoch, position = divmod(step, steps_per_epoch)
    order = epoch_order(num_rows, seed, epoch, shuffle)
    return epoch, order[position * prompts_per_step : (position + 1) * prompts_per_step]
