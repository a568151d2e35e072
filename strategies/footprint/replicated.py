"""The footprint of the replicating strategies (single, ddp): every rank holds the whole model and optimizer."""

from __future__ import annotations

from strategies.footprint import Footprint, dequant_bytes, frozen_bytes
from strategies.footprint.counts import DTYPE_BYTES, ParamCounts, Setting, tensors_of


class ReplicatedFootprint(Footprint):
    """ddp: fp32 trainable params, grads (DDP's all-reduce buckets, allocated once) and AdamW moments."""

    autocast = True

    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        c = DTYPE_BYTES[s.compute_dtype]
        tensors = tensors_of(counts)
        trainable = [t for t in tensors if t.trainable]
        n_train = sum(t.numel for t in trainable)
        return {
            "params": 4 * n_train + sum(frozen_bytes(t, c, s, False) for t in tensors if not t.trainable),
            "grads": 4 * n_train,
            "optimizer": 8 * n_train + 4 * len(trainable),
            "offloaded": 0,
        }

    def buffers(self, counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
        c = DTYPE_BYTES[s.compute_dtype]
        tensors = tensors_of(counts)
        trainable = [t.numel for t in tensors if t.trainable]
        # autocast keeps a compute-dtype copy of every fp32 weight it multiplies, for the backward
        autocast = sum(c * t.numel for t in tensors if t.matmul and t.storage in ("trainable", "fp32"))
        autocast = autocast if c != 4 else 0
        # torch AdamW on a GPU runs foreach: one fp32 temporary (sqrt of the variances) for every element
        adam = 4 * (sum(trainable) if s.device == "cuda" else max(trainable, default=0))
        return autocast + dequant_bytes(counts, s), adam, []


class SingleFootprint(ReplicatedFootprint):
    """single: as ddp, but its gradients come and go with each step (no buckets hold them)."""

    def held_in_backward(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> tuple[int, int]:
        """Gradients are set to None after each step and made by the backward, the output head's first
        (then each layer's as its activations are freed), so without accumulation none exist at the loss
        and only the layers' (non-layer) tensors' ones when the layers' backward starts. With accumulation
        the earlier micro-steps' are all there. (H200, bench/memory_check.py: single full was x1.15 over
        with every gradient counted at the loss.)"""
        if s.grad_accum > 1:
            return grads + buffers, grads + buffers
        outside = 4 * sum(t.numel for t in tensors_of(counts) if t.trainable and not t.in_layer)
        return buffers, min(grads, outside) + buffers

    def held_between_steps(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> int:
        """The step's zero_grad sets the gradients to None (DDP's buckets, unlike these, stay)."""
        return buffers
