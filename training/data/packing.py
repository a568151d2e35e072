"""Laying samples into rows: best-fit packing at prepare time, and micro-batch collation at train time.

A row is a list of segments (original samples) laid end to end. Attention must never cross a segment
boundary, and with transformers 5.24 position_ids alone do not ensure that for sdpa or eager: the model
builds a DynamicCache by default (config.use_cache), which turns off its packed-sequence detection. So
rows with several segments get an explicit 4D block-causal mask, which create_causal_mask returns as is;
or, for the per-sample sdpa kernel (training/kernels/attention.py), no mask but the segment lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from training.kernels.attention import PER_SAMPLE_SDPA, SEGMENTS_KWARG, PackedSegments

IGNORE_INDEX = -100
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", PER_SAMPLE_SDPA)
# A stored row: its tokens, shifted labels, the lengths of the samples laid in it, and per-row counts that
# let the sampler know every step's token and label totals without reading the token lists.
COLUMNS = ("input_ids", "labels", "segment_lengths", "length", "num_label_tokens", "num_segments")
# Feedback rows (kto) add whether their completion is desirable (the record's `label`: thumbs up or down).
DESIRABLE = "desirable"


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into bins of at most `capacity` tokens (longest first, tightest bin wins).

    Deterministic: ties go to the lower sample index and, among bins with equal room, the newest bin.
    A segment tree over "room left" finds the tightest fitting bin in O(log capacity).
    """
    size = 1
    while size < capacity + 1:
        size *= 2
    count = np.zeros(2 * size, dtype=np.int64)  # leaves: how many open bins have exactly r tokens of room
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    bins: list[list[int]] = []

    def update(room: int, delta: int) -> None:
        node = size + room
        while node:
            count[node] += delta
            node //= 2

    def tightest(need: int) -> int:  # smallest room >= need with an open bin, or -1
        def search(node: int, lo: int, hi: int) -> int:
            if hi < need or count[node] == 0:
                return -1
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            found = search(2 * node, lo, mid)
            return found if found >= 0 else search(2 * node + 1, mid + 1, hi)

        return search(1, 0, size - 1)

    for index in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        need = int(lengths[index])
        if need > capacity:
            raise ValueError(f"sample {index} has {need} tokens, more than the row capacity {capacity}")
        room = tightest(need)
        if room < 0:
            bins.append([])
            bin_id, room = len(bins) - 1, capacity
        else:
            bin_id = by_room[room].pop()
            update(room, -1)
        bins[bin_id].append(index)
        if room - need > 0:
            by_room[room - need].append(bin_id)
            update(room - need, 1)
    return bins


def row_features(labelled: bool = False):
    """The stored row schema: token lists as int32 (half of int64 on disk), per-row counts as scalars;
    `labelled` (feedback rows) adds the bool DESIRABLE column."""
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    scalar = datasets.Value("int32")
    lists = ("input_ids", "labels", "segment_lengths")
    features = {c: ints if c in lists else scalar for c in COLUMNS}
    if labelled:
        features[DESIRABLE] = datasets.Value("bool")
    return datasets.Features(features)


def pack_dataset(ds, capacity: int, out: Path):
    """Best-fit-decreasing rows of up to `capacity` tokens, concatenated with Arrow (no Python per token)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter

    table = ds.with_format("arrow")[:]
    lengths = table["length"].to_numpy()
    bins = best_fit_decreasing(lengths, capacity)
    path = str(out / "packed.arrow")
    with ArrowWriter(features=row_features(), path=path) as writer:
        for start in range(0, len(bins), 4096):
            chunk = bins[start : start + 4096]
            taken = table.take(pa.array([i for b in chunk for i in b], pa.int64())).combine_chunks()
            taken = {name: taken[name].combine_chunks() for name in COLUMNS}
            seg_starts = np.cumsum([0] + [len(b) for b in chunk])
            seg_offsets = pa.array(seg_starts, pa.int32())
            seg_starts, label_counts = seg_starts[:-1], np.asarray(taken["num_label_tokens"])
            tok_offsets = pa.array(np.cumsum([0] + [int(lengths[b].sum()) for b in chunk]), pa.int32())
            packed = {
                "input_ids": pa.ListArray.from_arrays(tok_offsets, pc.list_flatten(taken["input_ids"])),
                "labels": pa.ListArray.from_arrays(tok_offsets, pc.list_flatten(taken["labels"])),
                "segment_lengths": pa.ListArray.from_arrays(seg_offsets, taken["length"]),
                "length": pa.array([int(lengths[b].sum()) for b in chunk], pa.int32()),
                "num_label_tokens": pa.array(np.add.reduceat(label_counts, seg_starts), pa.int32()),
                "num_segments": pa.array([len(b) for b in chunk], pa.int32()),
            }
            writer.write_table(pa.table(packed))
        writer.finalize()
    return datasets.Dataset.from_file(path)


@dataclass
class MicroBatch:
    """One forward/backward's inputs; labels are already shifted (labels[r, i] is the target of position i)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    num_samples: int
    num_tokens: int
    num_label_tokens: int
    # The dataset rows laid in this micro-batch, in order: keys of per-row data computed elsewhere
    # (precomputed DPO reference log-probabilities). Set by the sampler, None from collate alone.
    row_ids: list[int] | None = None
    # Sample lengths of a packed padding-free row, for the per-sample kernel (instead of attention_mask).
    segments: PackedSegments | None = None
    # The columns where any row has a label, found on the host when collated: on CUDA, finding them
    # there (nonzero) would make the host wait for the device in the middle of every step.
    label_columns: torch.Tensor | None = None
    # [rows, T] 1 for a real token, 0 for padding; None for a padding-free row (every token real). What an
    # MoE router's load-balancing loss averages over (the attention mask may be a 4D block mask).
    padding_mask: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments of the model's forward for this micro-batch."""
        inputs = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }
        if self.segments is not None:
            inputs[SEGMENTS_KWARG] = self.segments
        return inputs

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (what `to` moves)."""
        names = ("input_ids", "position_ids", "labels", "attention_mask", "label_columns", "padding_mask")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to(self, device, dtype: torch.dtype | None = None) -> MicroBatch:
        """Move to `device`; `dtype` recasts an additive (eager) mask to the compute dtype, keeping it finite."""
        moved = {name: t.to(device, non_blocking=True) for name, t in self.tensors().items()}
        mask = moved.get("attention_mask")
        if mask is not None and mask.is_floating_point() and dtype is not None and mask.dtype != dtype:
            moved["attention_mask"] = torch.zeros_like(mask, dtype=dtype).masked_fill_(mask != 0, torch.finfo(dtype).min)
        return replace(self, **moved)


def block_causal_mask(segment_ids: torch.Tensor, attention: str) -> torch.Tensor:
    """[rows, 1, T, T] mask from [rows, T] segment ids: a token sees earlier tokens of its own segment.

    sdpa takes it as bool (True = may attend). eager adds the mask to the scores, so a bool mask there
    would add 0/1 instead of masking (measured: logits differ by 0.5); eager gets 0 / finfo.min in float32.
    """
    position = torch.arange(segment_ids.shape[-1])
    new_segment = torch.ones_like(segment_ids, dtype=torch.bool)
    new_segment[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(new_segment, position, 0).cummax(dim=-1).values  # where each token's segment starts
    # T x T is the cost of a dense mask (T=16k: 256 MiB); flash_attention_2 needs none.
    allowed = (position >= start[:, :, None]) & (position <= position[:, None])
    allowed = allowed[:, None]
    if attention == "eager":
        return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return allowed


def _positions_and_segments(segment_lengths: list[int], pad: int) -> tuple[list[int], list[int]]:
    positions, segments = [], []
    for seg, n in enumerate([*segment_lengths, pad] if pad else segment_lengths):
        positions += range(n)
        segments += [seg] * n
    return positions, segments


def collate(
    rows: list[dict], *, padding_free: bool = True, attention: str = "sdpa", pad_token_id: int = 0
) -> MicroBatch:
    """Rows (input_ids, labels, segment_lengths) → one MicroBatch.

    padding_free: every segment end to end in one [1, T] row, position_ids restarting per segment;
    block mask for sdpa/eager, None for flash_attention_2 (which splits on position_ids itself), and
    for sdpa_per_sample None with the segment lengths in `segments`.
    Otherwise: right-padded [rows, T_max] with a 2D 0/1 mask; packed rows (several segments) need a 4D
    block mask there too, where the padding tail is one more segment so no query row is fully masked.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
    lengths = [len(r["input_ids"]) for r in rows]
    num_samples = sum(len(r["segment_lengths"]) for r in rows)
    num_label_tokens = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    if padding_free:
        seg_lengths = [n for r in rows for n in r["segment_lengths"]]
        ids = [[t for r in rows for t in r["input_ids"]]]
        labels = [[t for r in rows for t in r["labels"]]]
        row_positions, row_segments = _positions_and_segments(seg_lengths, 0)
        positions, segments = [row_positions], [row_segments]
        packed = len(seg_lengths) > 1
        padded_2d = None
    else:
        t_max = max(lengths)
        pads = [t_max - n for n in lengths]
        ids = [list(r["input_ids"]) + [pad_token_id] * p for r, p in zip(rows, pads, strict=True)]
        labels = [list(r["labels"]) + [IGNORE_INDEX] * p for r, p in zip(rows, pads, strict=True)]
        layout = [_positions_and_segments(r["segment_lengths"], p) for r, p in zip(rows, pads, strict=True)]
        positions, segments = [p for p, _ in layout], [s for _, s in layout]
        packed = any(len(r["segment_lengths"]) > 1 for r in rows)
        padded_2d = torch.tensor([[1] * n + [0] * (t_max - n) for n in lengths], dtype=torch.long)
        if not packed:
            positions = [list(range(t_max)) for _ in rows]
    per_sample = None
    if not packed:
        mask = padded_2d  # None when padding-free: one causal sequence needs no mask
    elif attention == "flash_attention_2":
        mask = None
    elif attention == PER_SAMPLE_SDPA and padding_free:
        mask, per_sample = None, PackedSegments(seg_lengths)
    else:
        mask = block_causal_mask(torch.tensor(segments), attention)
    labels = torch.tensor(labels, dtype=torch.long)
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        labels=labels,
        attention_mask=mask,
        num_samples=num_samples,
        num_tokens=sum(lengths),
        num_label_tokens=num_label_tokens,
        segments=per_sample,
        label_columns=(labels != IGNORE_INDEX).any(dim=0).nonzero().flatten(),
        padding_mask=padded_2d,
    )
