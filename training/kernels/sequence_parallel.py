"""Ulysses sequence parallelism: a row's tokens split over a group of ranks, attention over every token.

With strategy.sequence_parallel N, each padding-free row is cut into N contiguous chunks (`chunk_micro_batch`,
training/data/sequence_chunks.py) and rank i of a group of N consecutive ranks runs chunk i through the model.
Everything but attention is per token, so a chunk alone is enough for it. Attention needs every earlier token
of the sample: around it, one all-to-all turns each rank's [chunk, every head] queries, keys and values into
[every token, a share of the heads], attention runs over the whole row for those heads, and a second
all-to-all turns the output back into [chunk, every head]. Activations per rank are those of T/N tokens; the
exchange moves 4 tensors of a layer each way (the DeepSpeed-Ulysses scheme, arXiv:2309.14509).

The attention over the whole row is the per-sample kernel (training/kernels/attention.py), on the row's
`ShardedSegments`: the samples of the whole row, so no sample sees another, whichever chunks it spans.
Position ids are each chunk's share of the row's, so rotary embeddings are those of the unsplit row.

Gradients need nothing more: the all-to-all's backward is the same all-to-all of the gradients (with equal
splits it is its own inverse), each rank's loss is the sum over its own label tokens, and every strategy
already averages gradients over all ranks, which sums each rank's share of the row's gradient.

Key and value heads that do not divide among the ranks are repeated to the query heads first (the job's plan
says so: launcher/sequence_rules.py); the query heads must divide.

Why not DeepSpeed's own (deepspeed.runtime.sequence_parallel.ulysses_sp, UlyssesSPAttentionHF, 0.18): one code
path for every strategy, and rows of several samples. DeepSpeed's hands the gathered row to the core attention
with the row's position ids and no segments; its sdpa core then runs causal over the whole row, so packed
samples attend to each other (only flash-attn's varlen kernel splits on position ids, and its flex path
hard-codes a causal mask without windows). It also wants its own process groups (mpu) in
deepspeed.initialize, which moves the gradient reduction off the strategies' world, and its data loader
adapter, which would replace the world-size invariant sampler. Here the exchange is two all_to_all_single
calls, the same under ddp, fsdp and zero1-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.kernels.attention import PackedSegments


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's place in sequence parallelism: `degree` ranks share each row, this one holds chunk `index`;
    `group` is their process group (None for a degree of 1)."""

    degree: int = 1
    index: int = 0
    group: dist.ProcessGroup | None = None

    @property
    def splits(self) -> bool:
        return self.degree > 1

    def data_rank(self, rank: int) -> int:
        """The data-parallel group of global rank `rank`: whose rows it takes."""
        return rank // self.degree


def sequence_group(degree: int, rank: int, world_size: int) -> SequenceGroup:
    """The group of `rank` among groups of `degree` consecutive ranks (on one node when the degree divides a
    node's ranks: the all-to-alls stay on its fast links). Every rank calls it, as `new_group` needs."""
    if degree == 1:
        return SequenceGroup()
    if world_size % degree:
        raise ValueError(f"sequence_parallel {degree} does not divide the {world_size} ranks")
    mine = None
    for first in range(0, world_size, degree):
        group = dist.new_group(list(range(first, first + degree)))
        if first <= rank < first + degree:
            mine = group
    return SequenceGroup(degree, rank % degree, mine)


class ShardedSegments(PackedSegments):
    """The sample lengths of a whole padding-free row whose tokens are split over `group`: this rank holds
    its `group.index`-th chunk of `sum(lengths) / degree` tokens."""

    def __init__(self, lengths: Sequence[int], group: SequenceGroup):
        super().__init__(lengths)
        total = sum(self.lengths)
        if total % group.degree:
            raise ValueError(f"a row of {total} tokens does not split into {group.degree} equal chunks")
        self.group = group
        self.chunk = total // group.degree

    def __repr__(self) -> str:
        return f"ShardedSegments({list(self.lengths)}, chunk {self.group.index} of {self.group.degree})"


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal splits; its backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    # Both buffers contiguous: the collective reads and writes memory in order, and empty_like would keep the
    # strides of a transposed view (the attention's [batch, heads, tokens, dim] queries are one).
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def heads_to_ranks(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """[1, heads, chunk, dim] of every head for this rank's tokens -> [1, heads / N, N * chunk, dim]: every
    token of the row for this rank's share of the heads (rank i gets heads i*h/N .. (i+1)*h/N)."""
    n = group.degree
    _, heads, chunk, dim = x.shape
    sent = x.reshape(n, heads // n, chunk, dim)  # part j goes to rank j
    received = _AllToAll.apply(sent, group.group)  # part j came from rank j: the row's chunk j
    return received.permute(1, 0, 2, 3).reshape(1, heads // n, n * chunk, dim)


def tokens_to_ranks(x: torch.Tensor, group: SequenceGroup) -> torch.Tensor:
    """The inverse for an attention output: [1, N * chunk, heads / N, dim] -> [1, chunk, heads, dim]."""
    n = group.degree
    _, tokens, heads, dim = x.shape
    chunk = tokens // n
    sent = x.reshape(n, chunk, heads, dim)  # chunk j goes back to rank j
    received = _AllToAll.apply(sent, group.group)  # from rank j: heads j*h/N .. of this rank's chunk
    return received.permute(1, 0, 2, 3).reshape(1, chunk, n * heads, dim)


def sharded_attention(query, key, value, segments: ShardedSegments, attend):
    """Attention of this rank's chunk of queries over the whole row: `attend(q, k, v, whole_segments)` runs on
    [1, heads / N, T, dim] and returns [1, T, heads / N, dim]; the result is [1, chunk, heads, dim]."""
    group = segments.group
    if query.shape[0] != 1 or query.shape[2] != segments.chunk or key.shape[2] != segments.chunk:
        raise ValueError(
            f"{segments} describe chunks of {segments.chunk} tokens of a padding-free row, but attention got "
            f"queries {tuple(query.shape)} and keys {tuple(key.shape)}"
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % group.degree:
        raise ValueError(f"{heads} query heads do not divide among {group.degree} ranks of sequence parallelism")
    if kv_heads % group.degree:  # repeated to the query heads (the plan said so)
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
    q, k, v = (heads_to_ranks(x, group) for x in (query, key, value))
    return tokens_to_ranks(attend(q, k, v, segments), group)  # segments: the whole row's samples, grouped once
