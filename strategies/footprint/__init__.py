"""Each strategy's footprint: what one of its ranks holds, in bytes, as plain arithmetic (no torch), so the
planner can ask a strategy what it costs without importing it (strategies/__init__.py gives each its own).

The byte model follows the strategies as implemented in strategies/ (torch 2.13, DeepSpeed 0.19,
transformers 5.24, peft 0.21); tests/ranks/test_planner_state.py checks params, grads and
optimizer against `Strategy.local_state_bytes()` on real ranks, and tests/unit/test_planner.py the activation
model against the tensors autograd saves.

- single/ddp (replicated.py): fp32 trainable params and grads, AdamW moments; bf16 compute is autocast,
  which keeps a bf16 copy of each trainable weight it multiplies for the backward (a buffer). DDP's grads
  are its buckets.
- fsdp (FSDP2, fsdp.py): fp32 trainable shards (dim-0 rows, rank 0 holds the largest), grads and moments
  sharded; buffers: the root group (embeddings, head) gathered for the whole step, two decoder layers
  gathered, one layer's unsharded grads for the reduce-scatter, and with accumulation every unsharded fp32
  grad.
- zero1/2/3 (DeepSpeed, zero.py): module params in the compute dtype, fp32 masters + moments in the
  optimizer on partitions (ZeRO-1/2: one flat group padded to 2 x ranks; ZeRO-3: each tensor ceil(n/ranks),
  tensors of at most 10 x hidden elements also kept whole); ZeRO-1 holds full grads until the accumulation
  boundary, ZeRO-2/3 their partitions; buffers: reduce bucket (hidden^2), ZeRO-3's gathered modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from strategies.footprint.counts import DTYPE_BYTES, ParamCounts, Setting, TensorInfo, nf4_bytes, tensors_of


class Footprint(ABC):
    """The bytes one rank of a strategy holds: its state, its working buffers, and which of them are held
    at the two moments a step can peak (launcher/candidates.py adds the activations)."""

    # bf16 compute runs as autocast over fp32 weights: an fp32 residual stream, a cast copy per matmul
    autocast: bool = False
    # training/kernels/ run under it (they read weights directly): not where a strategy gathers each weight in
    # its module's hooks (Strategy.gathers_params_in_module_hooks)
    kernels_apply: bool = True

    @abstractmethod
    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        """params, grads, optimizer (device) and offloaded (host) bytes of one rank, as
        `Strategy.local_state_bytes()` reports them: params and grads at their most within a step,
        optimizer state after a step (AdamW: two fp32 moments and a 4-byte step counter per tensor)."""

    @abstractmethod
    def buffers(self, counts: ParamCounts, s: Setting) -> tuple[int, int, list[str]]:
        """(forward/backward buffers, optimizer-step temporaries, notes) on the device of one rank."""

    def held_in_backward(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> tuple[int, int]:
        """(at the loss, in the layers' backward): gradient and buffer bytes held at the two moments
        launcher/shapes.py's activation_phases describes; `grads` and `buffers` are their most within a
        step. By default every one of them at both moments."""
        return grads + buffers, grads + buffers

    def held_between_steps(self, counts: ParamCounts, s: Setting, grads: int, buffers: int) -> int:
        """Gradient and buffer bytes held while no micro-step runs but the model runs forwards (grpo's
        generation, after the optimizer step): by default every one of them."""
        return grads + buffers

    def frozen_copy_bytes(self, counts: ParamCounts, s: Setting) -> int:
        """Bytes on one rank of a frozen copy of the whole model in the compute dtype, placed as this
        strategy places the trained model's parameters (grpo's reference under full fine-tuning). By
        default every rank holds all of it."""
        return DTYPE_BYTES[s.compute_dtype] * sum(t.numel for t in tensors_of(counts))


def frozen_bytes(t: TensorInfo, c: int, s: Setting, cast_to_compute: bool) -> int:
    """Bytes of one frozen tensor: 4-bit with its scales, fp32 (unless the module is cast), else compute."""
    if t.storage == "nf4":
        return nf4_bytes(t.numel, s.double_quant, s.quant_storage_bytes)
    if t.storage == "fp32" and not cast_to_compute:
        return 4 * t.numel
    return c * t.numel


def dequant_bytes(counts: ParamCounts, s: Setting) -> int:
    """bitsandbytes dequantises one 4-bit weight at a time for its matmul: the largest one, in compute."""
    largest_nf4 = max((t.numel for t in tensors_of(counts) if t.storage == "nf4"), default=0)
    return DTYPE_BYTES[s.compute_dtype] * largest_nf4
