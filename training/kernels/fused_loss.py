"""Cross-entropy through a frozen output projection, a chunk of tokens at a time: no full logits kept.

A causal LM's loss projects each label position's hidden state onto the vocabulary, upcasts the logits to
fp32 and takes cross-entropy. Autograd then keeps those logits and their fp32 copy for the backward, and
the backward makes their gradient: ~12 bytes per token per vocabulary entry, 25 GB for 16k tokens of a
128k vocabulary, the largest activation of a LoRA step on such a model. When the projection is frozen
(LoRA, QLoRA: its weight needs no gradient) the only gradient the loss sends back is the hidden states'.
So this computes it in the forward, chunk by chunk -- logits, log-sum-exp, softmax minus the one-hot
label, times the weight -- keeps that [tokens, hidden] gradient and frees every chunk's logits: the same
loss and gradient, from the same matmuls in the same dtypes, in a hidden state's worth of memory.
(Liger Kernel's fused linear cross-entropy does this with Triton kernels; this is plain torch, on any
device.)

How: the outermost causal LM's forward is replaced (Llama, Mistral, Qwen2, Qwen3, Phi-3: the ones whose
forward is `lm_head(hidden)` and nothing more; Gemma 3: that, then its final logit soft-capping, which the
chunks apply too, with its derivative). Mixture-of-experts models keep their own forward: it adds the
router's load-balancing loss, which this does not compute. Given the keyword LABELS it runs the decoder, keeps the hidden
states at `logits_to_keep` and returns the summed loss as `loss`, with no logits. Called through the
model's own forward, so DDP's, FSDP2's and PEFT's wrappers see an ordinary call. Not under ZeRO-3: it
gathers a weight in its module's hook, and this reads lm_head.weight without calling lm_head.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from training.data.packing import IGNORE_INDEX
from training.kernels.cpu_gemm import linear, pad_tokens

log = logging.getLogger(__name__)

LABELS = "sharpen_labels"
SUPPORTED = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "Gemma3ForCausalLM",
)
# Why the fused loss leaves a causal LM of these classes alone (the rank log says so); other classes than
# SUPPORTED: their forward is not one this reproduces.
NOT_SUPPORTED = {
    name: "its forward adds the router's load-balancing loss (aux_loss), which the fused loss does not compute"
    for name in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
}
# Logit elements of one chunk: 2^25 fp32 values are 128 MiB (256 tokens of a 128k vocabulary).
CHUNK_ELEMENTS = 1 << 25
_MARK = "_sharpen_fused_loss"
# The library code copied here (training/kernels/__init__.py): the SUPPORTED models' forward, which
# _fused_forward reproduces up to the projection (decoder, slice_logits_to_keep, lm_head and nothing more;
# Gemma 3's final_logit_softcapping after it).
UPSTREAM = {
    **{
        f"transformers.models.{name.lower()}.modeling_{name.lower()}.{name}ForCausalLM.forward": (
            "0aa066a8096e3b08",
            "_fused_forward in training/kernels/fused_loss.py runs this forward's decoder call and slicing, then "
            "the loss through lm_head's weight: anything added between the decoder and lm_head must be added there",
        )
        for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3")
    },
    "transformers.models.gemma3.modeling_gemma3.Gemma3ForCausalLM.forward": (
        "1f21518d3ec3c2f4",
        "_fused_forward in training/kernels/fused_loss.py runs this forward's decoder call and slicing, then "
        "the loss through lm_head's weight with config.final_logit_softcapping as this forward applies it",
    ),
}


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, label), ignoring IGNORE_INDEX, for a
    frozen weight: the hidden states' gradient is computed in the forward and scaled in the backward. With
    a `softcap` the logits are softcap * tanh(logits / softcap) first (Gemma's final soft-capping)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype, softcap):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        step = max(1, CHUNK_ELEMENTS // w.shape[0])
        for start in range(0, hidden.shape[0], step):
            h = hidden[start : start + step].to(compute_dtype)
            y = labels[start : start + step]
            logits = linear(pad_tokens(h), w, b)[: h.shape[0]].float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if grad is None:
                continue
            # d(sum of cross-entropy)/d(logits): softmax minus the one-hot label, 0 on ignored rows
            dlogits = torch.softmax(logits, dim=-1)
            valid = y != IGNORE_INDEX
            dlogits.scatter_add_(1, y.clamp(min=0)[:, None], valid[:, None].to(dlogits.dtype).neg())
            dlogits.mul_(valid[:, None])
            if softcap is not None:  # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2
                dlogits.mul_(1 - capped * capped)
            g = linear(pad_tokens(dlogits.to(compute_dtype)), w.t())[: h.shape[0]]
            grad[start : start + step] = g
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def frozen_head_loss_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (soft-capped at `softcap`, if given) against `labels`
    ([tokens, hidden], [tokens]), in the dtype an autocast region would use for the projection (else the
    hidden states'); its matmuls on this process's CPU matmul engine (training/kernels/cpu_gemm.py)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, labels, dtype, softcap)


def _fused_forward(self, *args, logits_to_keep=0, **kwargs):
    labels = kwargs.pop(LABELS, None)
    if labels is None:
        return self._sharpen_full_forward(*args, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    if self.lm_head.weight.requires_grad:  # unfrozen since: the plain loss, with its logits
        out = self._sharpen_full_forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        flat = out.logits.reshape(-1, out.logits.shape[-1]).float()
        out.loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        return out
    if args or kwargs.pop("labels", None) is not None:
        raise TypeError(f"{LABELS} is for keyword calls without `labels`")
    hidden = slice_logits_to_keep(self.model(**kwargs).last_hidden_state, logits_to_keep)
    if hidden.shape[:-1] != labels.shape:
        raise RuntimeError(f"hidden states of shape {tuple(hidden.shape)} for labels of shape {tuple(labels.shape)}")
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = frozen_head_loss_sum(hidden.reshape(-1, hidden.shape[-1]), self.lm_head, labels.reshape(-1), softcap)
    return CausalLMOutputWithPast(loss=loss)


def fuse_frozen_head_loss(model: nn.Module) -> bool:
    """Install the fused loss in `model` (any wrapper of a supported causal LM whose lm_head is frozen);
    returns whether it applies, and where it does not, says why on the rank log. The loss asks
    `fuses_frozen_head_loss` before passing LABELS."""
    from training.kernels import model_class, skipped

    lm = next((m for m in model.modules() if "lm_head" in m._modules), None)
    if lm is None:
        skipped("fused_loss", model_class(model), "it has no output projection (lm_head) to fuse the loss with")
        return False
    name = type(lm).__name__
    if name not in SUPPORTED:
        skipped("fused_loss", name, NOT_SUPPORTED.get(name, "its forward is not one the fused loss reproduces"))
        return False
    if type(lm.lm_head) is not nn.Linear:
        skipped("fused_loss", name, f"its lm_head is a {type(lm.lm_head).__name__}, not a plain Linear")
        return False
    if lm.lm_head.weight.requires_grad:
        skipped("fused_loss", name, "its output projection is trained (full fine-tuning), which needs the logits")
        return False
    if not hasattr(lm, "_sharpen_full_forward"):
        lm._sharpen_full_forward = lm.forward
        lm.forward = types.MethodType(_fused_forward, lm)
    setattr(model, _MARK, True)
    log.info("loss: cross-entropy through the frozen output projection in chunks, no full logits kept")
    return True


def fuses_frozen_head_loss(model: nn.Module) -> bool:
    """Whether `model`, or a module it wraps, had fuse_frozen_head_loss applied."""
    return any(getattr(module, _MARK, False) for module in model.modules())
