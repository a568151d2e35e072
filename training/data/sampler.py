"""World-size invariant sampling: global batch k holds the same samples whatever the ranks and accumulation.

Without weights (the default), or with one source, the rows of data.train are one pool, shuffled each epoch.
With a weight on every source, each is drawn at its own share (`Mix`): weight over the sum of the weights,
whatever the sources' sizes, each source walking its own shuffled epochs, so a small source drawn often
repeats. Either way a step's rows depend on the step number alone: resuming at step k continues them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np

from launcher.errors import UserError
from launcher.spec import mixing
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


@dataclass(frozen=True)
class Mix:
    """data.train's sources as stored rows (contiguous, in order: `rows` of each) and their weights.

    Source s is drawn at the rate weight[s] (a source with no rows, never); the draws are laid on one line by the
    Sainte-Laguë divisor method, draw m of source s at (2m + 1) / (2 x rate[s]), ties to the lower source.
    The first J draws are a function of J alone (no history), and draws J..J+G extend draws 0..J, so a step's
    counts per source never go negative and a resume needs no replay. Rates are exact integers.
    """

    rows: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, rows: list[int], weights: list[float | None]) -> Mix | None:
        """The mix of these sources; None without weights or with one source (one pool: `epoch_order`)."""
        if not mixing(weights):
            return None
        return cls(tuple(int(n) for n in rows), tuple(float(w) for w in weights))

    def shares(self) -> list[float]:
        """Each source's share of the drawn samples: its weight over the weights of the sources with rows."""
        return shares(self.rows, self.weights)

    @cached_property
    def spacing(self) -> list[int]:
        """Per source, the distance between its draws on the integer line (LCM of the rates / its rate)."""
        rates = [Fraction(w).limit_denominator(1 << 20) if n else Fraction(0)
                 for w, n in zip(self.weights, self.rows, strict=True)]
        scale = math.lcm(*(r.denominator for r in rates))
        whole = [int(r * scale) for r in rates]
        common = math.lcm(*(r for r in whole if r))
        return [common // r if r else 0 for r in whole]

    def draws_before(self, slots: int) -> list[int]:
        """How many of the first `slots` draws go to each source."""
        spacing = self.spacing
        if slots <= 0:
            return [0] * len(spacing)
        live = [d for d in spacing if d]

        def upto(x: int) -> list[int]:  # draws of each source at positions <= x
            return [(x // d + 1) // 2 if d else 0 for d in spacing]

        lo, hi = 0, 2 * slots * min(live)  # upto(hi) of the fastest source alone reaches `slots`
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(upto(mid)) >= slots:
                hi = mid
            else:
                lo = mid + 1
        before, at = upto(lo - 1), upto(lo)
        left = slots - sum(before)
        for s in range(len(spacing)):  # the draws tied at position lo, to the lower source first
            if left and at[s] > before[s]:
                before[s] += 1
                left -= 1
        return before

    def step_rows(self, step: int, global_batch_size: int, seed: int, shuffle: bool) -> np.ndarray:
        """The stored rows of global batch `step`, in the order they were drawn."""
        start = self.draws_before(step * global_batch_size)
        end = self.draws_before((step + 1) * global_batch_size)
        spacing, offsets = self.spacing, np.cumsum([0, *self.rows])
        drawn = []  # (position on the line, source, row)
        for s, (first, last) in enumerate(zip(start, end, strict=True)):
            for draw in range(first, last):
                epoch, index = divmod(draw, self.rows[s])
                row = offsets[s] + source_order(self.rows[s], seed, s, epoch, shuffle)[index]
                drawn.append(((2 * draw + 1) * spacing[s], s, int(row)))
        return np.asarray([row for *_, row in sorted(drawn)], dtype=np.int64)


def prepared_mix(cache: Path, weights: list[float | None]) -> Mix | None:
    """The Mix of a prepared cache entry's sources under data.train's `weights` (None: one pool)."""
    if not mixing(weights):
        return None
    from training.data.cache import prepared_sources

    return Mix.of([source["rows"] for source in prepared_sources(cache)], weights)


def shares(rows: list[int], weights: list[float | None]) -> list[float]:
    """Each source's share of the samples drawn: with weights, its weight over those of the sources that have
    rows; without, its share of the one pool's rows."""
    if mixing(weights):
        rates = [w if n else 0.0 for w, n in zip(weights, rows, strict=True)]
    else:
        rates = [float(n) for n in rows]
    total = sum(rates)
    return [r / total if total else 0.0 for r in rates]


_SOURCE_ORDERS: dict[tuple, np.ndarray] = {}


def source_order(num_rows: int, seed: int, source: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Source `source`'s own order of its rows in its `epoch`: seeded by (seed, source, epoch), kept for reuse."""
    key = (num_rows, seed, source, epoch, shuffle)
    order = _SOURCE_ORDERS.get(key)
    if order is None:
        if len(_SOURCE_ORDERS) > 64:
            _SOURCE_ORDERS.clear()
        order = np.arange(num_rows) if not shuffle else np.random.default_rng(
            [seed % (1 << 63), epoch, source + 1]
        ).permutation(num_rows)
        _SOURCE_ORDERS[key] = order
    return order


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
    mix: Mix | None = None,
    split_row: Callable[[MicroBatch], MicroBatch] | None = None,
) -> Iterator[StepBatch]:
    """This rank's StepBatch for steps start_step, start_step + 1, ... over endless epochs.

    rank and world_size are data-parallel: with sequence parallelism, the group's, and `split_row` cuts each of
    its micro-batches to this rank's share of the row (training/data/sequence_chunks.py).

    Global batch k is rows order[e][j*G:(j+1)*G] (e, j = divmod(k, rows // G)) whatever the world size
    and accumulation, or with a `mix` its draws k*G..(k+1)*G (`Mix.step_rows`); the global counts come
    from stored per-row counts, so no collective is needed.
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
    if mix is not None and sum(mix.rows) != len(lengths):
        raise ValueError(f"the mix's sources hold {sum(mix.rows)} rows, the dataset {len(lengths)}")
    if steps_per_epoch == 0 and mix is None:
        raise UserError(
            f"the training data has {len(lengths)} rows, fewer than train.global_batch_size ({global_batch_size})",
            hint="lower train.global_batch_size, add data, or turn data.packing off",
        )
    rows_of = dataset.select_columns(["input_ids", "labels", "segment_lengths"])
    order, order_epoch = None, -1
    for step in range(start_step, 1 << 62):
        if mix is not None:  # an epoch: as many samples drawn as there are rows
            epoch, members = step * global_batch_size // len(lengths), mix.step_rows(step, global_batch_size, seed, shuffle)
        else:
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
        if split_row is not None:
            micro_batches = [split_row(micro) for micro in micro_batches]
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
