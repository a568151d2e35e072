"""The footprint of DeepSpeed's ZeRO stages: the module in the compute dtype, fp32 masters and AdamW moments
on partitions (stages 1-2: one flat group; stage 3: each tensor), with the sizes of strategies/deepspeed_sizes.py."""

from __future__ import annotations

from math import ceil

from strategies.deepspeed_sizes import PREFETCH_SHARE, ZERO3_SUB_GROUP, persistence_threshold, reduce_bucket
from strategies.footprint import Footprint, dequant_bytes, frozen_bytes
from strategies.footprint.counts import DTYPE_BYTES, ParamCounts, Setting, nf4_bytes, tensors_of


def _bucket_bytes(counts: ParamCounts, s: Setting) -> int:
    return DTYPE_BYTES[s.compute_dtype] * reduce_bucket(counts.hidden_size)


class PartitionedFootprint(Footprint):
    """ZeRO-1/2: one flat group of the trainable params, padded to 2 x ranks elements and partitioned.
    ZeRO-1 holds the full compute-dtype grads until the accumulation boundary, ZeRO-2 its partition."""

    def __init__(self, stage: int):
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage 1 or 2, not {stage} (stage 3 is Zero3Footprint)")
        self.stage = stage

    def _partition(self, counts: ParamCounts, s: Setting) -> int:
        n_train = sum(t.numel for t in tensors_of(counts) if t.trainable)
        return ceil(n_train / (2 * max(1, s.world_size))) * 2

    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        c = DTYPE_BYTES[s.compute_dtype]
        tensors = tensors_of(counts)
        n_train = sum(t.numel for t in tensors if t.trainable)
        partition = self._partition(counts, s)
        params = c * n_train + sum(frozen_bytes(t, c, s, True) for t in tensors if not t.trainable)
        full_grads = self.stage == 1
        optimizer = 12 * partition + 4
        if s.offload != "none":  # fp32 grads (pinned) and a compute-dtype staging copy live on the host too
            offloaded = optimizer + 4 * partition + c * partition
            grads = c * n_train if full_grads else 0
            return {"params": params, "grads": grads, "optimizer": 0, "offloaded": offloaded}
        grads = c * n_train if full_grads else c * partition
        return {"params": params, "grads": grads, "optimizer": optimizer, "offloaded": 0}

    def buffers(self, counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
        c = DTYPE_BYTES[s.compute_dtype]
        largest_trainable = max((t.numel for t in tensors_of(counts) if t.trainable), default=0)
        buffers = _bucket_bytes(counts, s) + (c * largest_trainable if self.stage == 2 else 0)
        step = 8 * self._partition(counts, s) if s.offload == "none" else 0
        return buffers + dequant_bytes(counts, s), step, []


class Zero3Footprint(Footprint):
    """ZeRO-3: each tensor partitioned, ceil(n / ranks) elements a rank; tensors under the persistence
    threshold also kept whole on every rank. Offloading params leaves only those on the device."""

    kernels_apply = False  # ZeRO-3 gathers each weight in its module's hooks

    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        c = DTYPE_BYTES[s.compute_dtype]
        world = max(1, s.world_size)
        tensors = tensors_of(counts)
        threshold = persistence_threshold(counts.hidden_size)
        params = 0
        for t in tensors:  # the module is cast to the compute dtype; 4-bit weights keep their bytes
            full = (
                nf4_bytes(t.numel, s.double_quant, s.quant_storage_bytes)
                if t.storage == "nf4"
                else c * t.numel
            )
            params += full * ceil(t.numel / world) // t.numel
            if t.numel <= threshold:
                params += full  # persistent: also kept gathered on every rank
        local = sum(ceil(t.numel / world) for t in tensors if t.trainable)
        optimizer = 12 * local + 4 * max(1, ceil(local / ZERO3_SUB_GROUP))
        out = {"params": params, "grads": c * local, "optimizer": optimizer, "offloaded": 0}
        if s.offload != "none":
            out.update(offloaded=optimizer + c * local, grads=0, optimizer=0)
        if s.offload == "params":
            persistent = sum(c * t.numel for t in tensors if t.numel <= threshold)
            out["offloaded"] += params - persistent
            out["params"] = persistent
        return out

    def buffers(self, counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
        c = DTYPE_BYTES[s.compute_dtype]
        world = max(1, s.world_size)
        tensors = tensors_of(counts)
        trainable = [t.numel for t in tensors if t.trainable]
        largest = max((t.numel for t in tensors), default=0)
        local = sum(ceil(n / world) for n in trainable)
        bucket = _bucket_bytes(counts, s)
        # the prefetch share applies to the bucket's bytes here, to its elements in the config: < c bytes apart
        prefetch = int(PREFETCH_SHARE * bucket)
        buffers = bucket + prefetch + c * largest + c * max(trainable, default=0) + dequant_bytes(counts, s)
        step = (4 * local if c != 4 else 0) + 4 * min(local, ZERO3_SUB_GROUP)
        return buffers, (step if s.offload == "none" else 0), []

    def frozen_copy_bytes(self, counts: ParamCounts, s: Setting) -> int:
        """A frozen copy partitioned as the module: ceil(n / ranks) of each tensor, small ones also whole."""
        c = DTYPE_BYTES[s.compute_dtype]
        world = max(1, s.world_size)
        threshold = persistence_threshold(counts.hidden_size)
        tensors = tensors_of(counts)
        return c * sum(ceil(t.numel / world) + (t.numel if t.numel <= threshold else 0) for t in tensors)
