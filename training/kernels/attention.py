"""Per-sample attention for padding-free rows: sdpa with `is_causal` on each packed sample, not on the row.

A padding-free micro-batch is one [1, T] row of samples laid end to end. With a block-causal [T, T] mask,
sdpa computes every score of the row and throws most away (on the CPU bench job, 3.6x the work of the
samples alone). Here the row is cut at the sample boundaries the collator already knows
(`PackedSegments`) and each sample runs causal sdpa on its own; samples of equal length share one
batched call, so the Python cost grows with the number of distinct lengths, not of samples.
flash_attention_2 does the same on GPU from position_ids. A layer with a sliding window (Mistral's,
Gemma's sliding layers) gets it per sample: a banded causal mask for a sample longer than the window, plain
causal for one no longer (it sees all of itself either way). The collator's block mask of the other paths
(sdpa on CUDA, eager) has no window: launcher/family_rules.py refuses those before launch where a sample
can be longer than a model's window.

The kernel is registered with transformers' AttentionInterface as `sdpa_per_sample`: `kernel_name` maps
the job's `sdpa` to it, and `collate_attention` says when the collator hands it segments instead of a
mask (on the CPU). The segments arrive as the model-forward keyword `packed_segments`, which transformers
passes through to every attention call (MicroBatch.model_inputs adds it). Given a mask, or no segments,
the kernel is transformers' sdpa. Its mask function builds padding masks as sdpa's does, but none for
an unpadded row: the segments stand in for transformers' packed-sequence detection, which would build
the dense [T, T] mask again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PER_SAMPLE_SDPA = "sdpa_per_sample"
SEGMENTS_KWARG = "packed_segments"
# Attention features the per-sample path does not implement; with any of them the row takes the dense
# block mask instead (sdpa then refuses softcap itself; launcher/family_rules.py refuses it before launch).
_DENSE_ONLY = ("softcap", "s_aux", "position_bias")
# The library code copied here (training/kernels/__init__.py): transformers' sdpa attention function,
# whose causal path (repeat_kv, is_causal, the [batch, T, heads, dim] output) per_sample_sdpa runs per sample.
UPSTREAM = {
    "transformers.integrations.sdpa_attention.sdpa_attention_forward": (
        "12de12619b30c3d2",
        "sdpa_per_sample_forward and per_sample_sdpa in training/kernels/attention.py: the same keys, values, "
        "causality, scale and output layout, and _DENSE_ONLY naming every feature they do not implement",
    ),
    "transformers.masking_utils.sliding_window_overlay": (
        "c46ef286e4d5610f",
        "window_mask in training/kernels/attention.py: a query sees the keys less than the window behind it",
    ),
}


class PackedSegments:
    """The sample lengths of a padding-free [1, T] row, grouped by length (one sdpa call per group)."""

    def __init__(self, lengths: Sequence[int]):
        self.lengths = tuple(int(n) for n in lengths)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            by_length.setdefault(n, []).append(i)
        self.groups = tuple(tuple(samples) for samples in by_length.values())

    def __repr__(self) -> str:
        return f"PackedSegments({list(self.lengths)})"

    def dense_mask(self, device: torch.device, window: int | None = None) -> torch.Tensor:
        """[1, 1, T, T] block-causal bool mask, within a sliding `window` if given, for attention features the
        per-sample path lacks."""
        from training.data.packing import block_causal_mask

        ids = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        mask = block_causal_mask(ids[None], "sdpa")
        if window is not None:
            mask &= window_mask(mask.shape[-1], window)
        return mask.to(device)


def window_mask(length: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[length, length] bool: query i may see key j where j > i - window (transformers' sliding_window_overlay;
    causality is the caller's)."""
    position = torch.arange(length, device=device)
    return position[None, :] > position[:, None] - window


_EAGER: list = []


def _eager_per_sample_sdpa():
    """per_sample_sdpa kept out of torch.compile (model.compile): a Python loop over data-dependent lengths.
    Wrapped on first use, not at import: torch.compiler.disable imports dynamo (~0.8 s of start-up)."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(per_sample_sdpa))
    return _EAGER[0]


def per_sample_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: PackedSegments,
    dropout: float = 0.0, scale: float | None = None, window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each segment on its own, within a sliding `window` if given. q, k, v: [1, heads, T,
    head_dim] (k, v already repeated to the query heads); returns [1, T, heads, head_dim] like transformers'
    attention functions.

    Built from split / cat only, whose backward passes are one cat / views: slicing each segment instead
    would make autograd zero-fill a full-size gradient per segment (measured: more than the attention
    saved). Every sdpa call is 4D: the CPU flash kernel takes nothing else (3D falls to unfused math)."""
    qs, ks, vs = (x.split(segments.lengths, dim=2) for x in (query, key, value))
    pieces: list[torch.Tensor | None] = [None] * len(segments.lengths)
    for samples in segments.groups:
        if len(samples) == 1:
            (i,) = samples
            q, k, v = qs[i], ks[i], vs[i]
        else:  # samples of one length: one batched call, [count, heads, n, dim]
            q, k, v = (torch.cat([xs[i] for i in samples]) for xs in (qs, ks, vs))
        n = q.shape[2]
        if window is None or n <= window:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True)
        else:  # a band: causal, and no key `window` or more behind its query
            band = window_mask(n, window, q.device).tril_()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scale)
        for j, i in enumerate(samples):
            pieces[i] = out[j : j + 1].transpose(1, 2)  # [1, n, heads, dim]
    return torch.cat(pieces, dim=1)


def sdpa_per_sample_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: per sample when the forward was given `packed_segments`."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    segments: PackedSegments | None = kwargs.pop(SEGMENTS_KWARG, None)
    window = kwargs.get("sliding_window")  # the layer's: None for a full-attention layer
    if getattr(segments, "group", None) is not None:  # a chunk of a row split over ranks (sequence_parallel.py)
        return _sharded_forward(module, query, key, value, segments, dropout, scaling, is_causal, window, kwargs)
    if segments is None and attention_mask is None and window is not None and query.shape[2] > window:
        # An unpadded row longer than the window, for which _per_sample_mask made no mask: the band is the
        # mask transformers' own sdpa path would have built for this sliding layer.
        length = query.shape[2]
        attention_mask = window_mask(length, window, query.device).tril_()[None, None]
    if segments is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] != sum(segments.lengths):
        raise ValueError(
            f"{SEGMENTS_KWARG} {segments} describe a padding-free [1, {sum(segments.lengths)}] row, "
            f"but attention got queries {tuple(query.shape)} and keys {tuple(key.shape)}"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or any(kwargs.get(name) is not None for name in _DENSE_ONLY):
        mask = segments.dense_mask(query.device, window)
        return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _eager_per_sample_sdpa()(query, key, value, segments, dropout, scaling, window), None


def _sharded_forward(module, query, key, value, segments, dropout, scaling, is_causal, window, kwargs):
    """Sequence parallelism's attention: this rank's chunk of the queries over the whole row, per sample."""
    from training.kernels.sequence_parallel import sharded_attention

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dense = [name for name in _DENSE_ONLY if kwargs.get(name) is not None]
    if not causal or dense:
        what = "non-causal attention" if not causal else f"attention with {', '.join(dense)}"
        raise ValueError(f"sequence parallelism runs causal attention per sample, not {what}")

    def attend(q, k, v, whole):
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            from transformers.integrations.sdpa_attention import repeat_kv

            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return _eager_per_sample_sdpa()(q, k, v, whole, dropout, scaling, window)

    return sharded_attention(query, key, value, segments, attend), None


def _per_sample_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """sdpa's mask where the batch has padding (a 2D mask); none for an unpadded row (see the module doc)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def kernel_name(attention: str) -> str:
    """transformers' attn_implementation for the job's model.attention: sdpa runs as sdpa_per_sample, which
    is transformers' sdpa exactly for every batch that comes with a mask."""
    if attention != "sdpa":
        return attention
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_SAMPLE_SDPA, sdpa_per_sample_forward)
    AttentionMaskInterface.register(PER_SAMPLE_SDPA, _per_sample_mask)
    return PER_SAMPLE_SDPA


def collate_attention(attention: str, device: torch.device | str) -> str:
    """The collator's `attention` for the job's model.attention on `device`: segments instead of a block
    mask for sdpa on the CPU. On CUDA the dense mask stays: on an H200 (bf16, 8 layers of 2048 wide)
    per-sample was 23% slower on a 2048-token row of 9 samples (a launch per sample and layer) and 38%
    faster on 8192 tokens of 20; flash_attention_2 is the kernel for packed rows there."""
    if attention == "sdpa" and torch.device(device).type == "cpu":
        return PER_SAMPLE_SDPA
    return attention
