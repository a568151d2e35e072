"""The footprint of fsdp (FSDP2 `fully_shard`): dim-0 shards of every tensor, one group per decoder layer."""

from __future__ import annotations

from math import ceil

from strategies.footprint import Footprint, dequant_bytes, frozen_bytes
from strategies.footprint.counts import (
    DTYPE_BYTES,
    ParamCounts,
    Setting,
    TensorInfo,
    packed_bytes,
    tensors_of,
)


def fsdp_rows(dim0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank` (torch.chunk: ceil-sized chunks, the last ones short or empty)."""
    chunk = ceil(dim0 / world)
    return max(0, min(dim0, (rank + 1) * chunk) - rank * chunk)


def _shard(t: TensorInfo, s: Setting) -> int:
    """Elements of `t` on rank s.rank."""
    return fsdp_rows(t.dim0, max(1, s.world_size), s.rank) * (t.numel // max(1, t.dim0))


class FSDPFootprint(Footprint):
    """fp32 trainable shards, grads and AdamW moments sharded; any offload moves them all to the host."""

    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        c = DTYPE_BYTES[s.compute_dtype]
        world = max(1, s.world_size)
        tensors = tensors_of(counts)
        trainable = [t for t in tensors if t.trainable]
        local = sum(_shard(t, s) for t in trainable)
        frozen = 0
        for t in tensors:
            if t.trainable:
                continue
            full = frozen_bytes(t, c, s, False)
            if t.storage == "nf4":  # the packed weight is sharded, its block scales are not
                packed = packed_bytes(t, s)
                frozen += full - packed + ceil(packed / world)
            else:
                frozen += full // t.numel * _shard(t, s)
        out = {"params": 4 * local + frozen, "grads": 4 * local, "optimizer": 8 * local + 4 * len(trainable)}
        if s.offload != "none":  # CPUOffloadPolicy: params, grads and AdamW all live on the host
            return {"params": 0, "grads": 0, "optimizer": 0, "offloaded": sum(out.values())}
        return {**out, "offloaded": 0}

    def _gathered(self, counts: ParamCounts, s: Setting) -> int:
        """The groups gathered for a forward: the root group (embeddings, head) and two decoder layers (all
        of them without reshard_after_forward), and one 4-bit weight dequantised."""
        c = DTYPE_BYTES[s.compute_dtype]
        tensors = tensors_of(counts)
        layers = max(1, counts.num_layers)

        def gathered(t: TensorInfo) -> int:
            return packed_bytes(t, s) if t.storage == "nf4" else c * t.numel

        root = sum(gathered(t) for t in tensors if not t.in_layer)
        layer = sum(gathered(t) for t in tensors if t.in_layer) // layers
        live = layers if not s.reshard_after_forward else min(2, layers)
        return root + live * layer + dequant_bytes(counts, s)

    def buffers(self, counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
        c = DTYPE_BYTES[s.compute_dtype]
        tensors = tensors_of(counts)
        trainable = [t for t in tensors if t.trainable]
        layers = max(1, counts.num_layers)
        layer_grads = sum(t.numel for t in trainable if t.in_layer) // layers
        buffers = self._gathered(counts, s) + layer_grads * (c + (4 if c != 4 else 0))
        notes = []
        if s.grad_accum > 1:
            buffers += 4 * sum(t.numel for t in trainable)
            notes.append(
                "fsdp keeps every unsharded fp32 gradient between micro-steps (gradient accumulation)"
            )
        local = sum(_shard(t, s) for t in trainable)
        return buffers, (4 * local if s.offload == "none" else 0), notes

    def held_in_backward(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> tuple[int, int]:
        """The root group reshards after the forward like every other, and is gathered again by the first
        gradient reaching the head, after the loss's backward: at the loss only the accumulated unsharded
        gradients of earlier micro-steps are held; sharded gradients come from the reduce-scatters, the
        root's last. (H200, bench/memory_check.py: fsdp full was x1.11/x1.19 over with them counted.)"""
        n_train = sum(t.numel for t in tensors_of(counts) if t.trainable)
        accumulated = 4 * n_train if s.grad_accum > 1 else 0
        return accumulated, buffers

    def held_between_steps(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> int:
        """The optimizer step's zero_grad sets every gradient to None; a forward gathers as in training."""
        return self._gathered(counts, s)

    def frozen_copy_bytes(self, counts: ParamCounts, s: Setting) -> int:
        """A frozen copy fully_shard-ed as the policy: each rank its dim-0 shard of every tensor."""
        return DTYPE_BYTES[s.compute_dtype] * sum(_shard(t, s) for t in tensors_of(counts))
