"""Per-sample sdpa (training/kernels/attention.py) against the dense block-causal mask it replaces, and its
sliding windows against each sample run alone through transformers' own eager attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.kernel_inputs import LENGTHS, packed_rows, tiny_family, tiny_llama

from training.data.packing import collate
from training.kernels.attention import (
    PER_SAMPLE_SDPA,
    PackedSegments,
    collate_attention,
    kernel_name,
    per_sample_sdpa,
    sdpa_per_sample_forward,
)

WINDOW = 8
# Samples longer than the window (12 twice: one batched banded call, 20), one as long (plain causal), shorter ones.
WINDOWED = [8, 12, 7, 1, 20, 12, 5]


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


@pytest.mark.parametrize(("family", "fields"), [("gemma3", {}), ("mistral", {"sliding_window": WINDOW})])
def test_sliding_windows_per_sample_are_each_sample_alone(family, fields):
    """Gemma 3 (a sliding layer of window 8, then a full one) and Mistral with a window of 8 in every layer: a
    packed row through the per-sample kernel gives each sample the logits it has alone through transformers'
    eager attention, which builds the window itself."""
    model = tiny_family(family, **fields).eval()
    assert model.config.sliding_window == WINDOW
    rows = packed_rows(WINDOWED)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows]
        model.set_attn_implementation(kernel_name("sdpa"))
        packed = model(**collate(rows, attention=PER_SAMPLE_SDPA).model_inputs()).logits[0]
    for i, (got, want) in enumerate(zip(packed.split(WINDOWED), alone, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"sample {i} of {WINDOWED[i]} tokens")
    if family == "mistral":  # the window matters: without it the long sample's logits are others
        unwindowed = copy.deepcopy(model)
        unwindowed.config.sliding_window = None
        unwindowed.set_attn_implementation("eager")
        with torch.no_grad():
            full = unwindowed(input_ids=torch.tensor([rows[4]["input_ids"]])).logits[0]
        assert (full[WINDOW:] - alone[4][WINDOW:]).abs().max() > 1e-3
        torch.testing.assert_close(full[:WINDOW], alone[4][:WINDOW], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "fields"), [("gemma3", {}), ("mistral", {"sliding_window": WINDOW})])
def test_an_unpacked_row_longer_than_the_window_keeps_it(family, fields):
    """One sample, no padding, no segments (generation's prefill, an eval row, a probe): no mask comes with it,
    and the kernel still gives each sliding layer its window, as transformers' own sdpa and eager do."""
    model = tiny_family(family, **fields).eval()
    ids = torch.tensor([packed_rows([3 * WINDOW])[0]["input_ids"]])
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = model(input_ids=ids).logits
        model.set_attn_implementation(kernel_name("sdpa"))
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_window_is_a_band_per_sample_and_in_the_dense_mask():
    """The kernel's window, per sample and in the dense mask it falls back to (for sinks, here), is sdpa over a
    block-causal mask in which no key is `window` or more behind its query."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    segments = PackedSegments([3, 9, 9, 4])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 25, 16, generator=g) for _ in range(3))
    position = torch.arange(25)
    band = segments.dense_mask(q.device) & (position[None, :] > position[:, None] - 4)
    torch.testing.assert_close(segments.dense_mask(q.device, 4), band)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(1, 2)
    torch.testing.assert_close(per_sample_sdpa(q, k, v, segments, window=4), want, atol=1e-6, rtol=0)
    sink = {"s_aux": torch.zeros(2)}  # a feature the per-sample path lacks: the dense mask, window and all
    out, _ = sdpa_per_sample_forward(module, q, k, v, None, packed_segments=segments, sliding_window=4, **sink)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    unwindowed = F.scaled_dot_product_attention(q, k, v, attn_mask=segments.dense_mask(q.device)).transpose(1, 2)
    assert (unwindowed - want).abs().max() > 1e-2


def test_features_it_lacks_fall_back_to_the_dense_mask():
    """Softcap, sinks or a position bias are left to sdpa over the block-causal mask; a window no shorter than
    any sample changes nothing."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    segments = PackedSegments([3, 5])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=segments.dense_mask(q.device)).transpose(1, 2)
    for extra in ({}, {"sliding_window": 4096}, {"s_aux": torch.zeros(2)}):
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
