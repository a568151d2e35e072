"""Per-sample sdpa (training/kernels/attention.py) against the dense block-causal mask it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.kernel_inputs import LENGTHS, packed_rows, tiny_llama

from training.data.packing import collate
from training.kernels.attention import (
    PER_SAMPLE_SDPA,
    PackedSegments,
    collate_attention,
    kernel_name,
    sdpa_per_sample_forward,
)


def logits_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs()).logits
    F.cross_entropy(logits[0].float(), batch.labels[0], ignore_index=-100).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_sample_equals_block_mask_logits_and_grads(checkpointing):
    model = tiny_llama().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = packed_rows(LENGTHS)
    dense = collate(rows, attention="sdpa")
    per_sample = collate(rows, attention=PER_SAMPLE_SDPA)
    assert dense.attention_mask.shape == (1, 1, sum(LENGTHS), sum(LENGTHS))
    assert per_sample.attention_mask is None and per_sample.segments.lengths == tuple(LENGTHS)
    assert per_sample.segments.groups == ((0, 2), (1, 5), (3,), (4,), (6,))

    model.set_attn_implementation("sdpa")
    want_logits, want_grads = logits_and_grads(model, dense)
    model.set_attn_implementation(kernel_name("sdpa"))
    got_logits, got_grads = logits_and_grads(model, per_sample)

    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_segments_it_is_transformers_sdpa():
    """Unpacked rows and padded batches (2D masks) take transformers' own sdpa path, mask and all."""
    model = tiny_llama(layers=1).eval()
    rows = packed_rows([9, 4, 6])
    padded = collate(rows, padding_free=False, attention="sdpa", pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(**padded.model_inputs()).logits
        model.set_attn_implementation(kernel_name("sdpa"))
        got = model(**collate(rows, padding_free=False, attention=PER_SAMPLE_SDPA).model_inputs()).logits
    assert padded.attention_mask.dim() == 2
    real = padded.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)


def test_features_it_lacks_fall_back_to_the_dense_mask():
    """A sliding window (or softcap, sinks, position bias) is left to sdpa over the block-causal mask."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    segments = PackedSegments([3, 5])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=segments.dense_mask(q.device)).transpose(1, 2)
    for extra in ({}, {"sliding_window": 4096}):
        out, _ = sdpa_per_sample_forward(module, q, k, v, None, packed_segments=segments, **extra)
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="padding-free"):
        sdpa_per_sample_forward(module, q, k, v, None, packed_segments=PackedSegments([3, 4]))


def test_only_the_jobs_sdpa_maps_to_the_per_sample_kernel():
    assert kernel_name("sdpa") == PER_SAMPLE_SDPA
    assert kernel_name("eager") == "eager" and kernel_name("flash_attention_2") == "flash_attention_2"
    # segments on the CPU; on CUDA the block mask (measured slower per sample on short rows there)
    assert collate_attention("sdpa", torch.device("cpu")) == PER_SAMPLE_SDPA
    assert collate_attention("sdpa", "cuda:0") == "sdpa" and collate_attention("eager", "cpu") == "eager"
