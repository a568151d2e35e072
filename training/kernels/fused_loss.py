"""Cross-entropy through the output projection, a chunk of tokens at a time: no full logits kept.

A causal LM's loss projects each label position's hidden state onto the vocabulary, upcasts the logits to
fp32 and takes cross-entropy. Autograd then keeps those logits and their fp32 copy for the backward, and
the backward makes their gradient: ~12 bytes per token per vocabulary entry, 25 GB for 16k tokens of a
128k vocabulary, the largest activation of a step on such a model (and of a 64k-token row, 100 GB). The
loss's backward needs nothing of those logits but their gradient, softmax minus the one-hot label. So
this computes every gradient the loss sends back in the forward, chunk by chunk -- logits, log-sum-exp,
softmax minus the one-hot label, then times the weight for the hidden states' gradient and, where the
projection is trained (full fine-tuning), that gradient transposed times the chunk's hidden states for the
weight's (and summed over tokens for a bias's), accumulated over the chunks in fp32 -- keeps those and
frees every chunk's logits: the same loss and gradients, from the same matmuls in the same dtypes, in a
hidden state's worth of memory beside the weight's gradient, which the plain backward makes too. A
frozen projection (LoRA, QLoRA) gets no weight gradient. Tied embeddings (Gemma, small Qwen: lm_head's
weight is embed_tokens') need nothing more: autograd sums this gradient and the embedding's into the one
parameter. (Liger Kernel's fused linear cross-entropy does this with Triton kernels; this is plain torch,
on any device.)

How: the outermost causal LM's forward is replaced (Llama, Mistral, Qwen2, Qwen3, Phi-3: the ones whose
forward is `lm_head(hidden)` and nothing more; Gemma 3: that, then its final logit soft-capping, which the
chunks apply too, with its derivative). Mixture-of-experts models keep their own forward: it adds the
router's load-balancing loss, which this does not compute. Given the keyword LABELS it runs the decoder, keeps the hidden
states at `logits_to_keep` and returns the summed loss as `loss`, with no logits. Called through the
model's own forward, so DDP's, FSDP2's and PEFT's wrappers see an ordinary call. The weight's gradient
reaches the strategies as any other: autograd hands it to the parameter's AccumulateGrad, where DDP's
reducer and DeepSpeed ZeRO-1/2 (`register_post_accumulate_grad_hook`) hook, and FSDP2 reads the root
unit's unsharded parameter's `.grad` in its post-backward (the root's runs in the final callback, after
this backward). Not under ZeRO-3: it gathers a weight in its module's hook, and this reads lm_head.weight
without calling lm_head.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from training.data.packing import IGNORE_INDEX
from training.kernels.cpu_gemm import linear, pad_tokens, token_contraction

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


class _HeadCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T + bias, label), ignoring IGNORE_INDEX, with every
    gradient it needs computed in the forward, chunk by chunk, and scaled in the backward: the hidden
    states' ([tokens, hidden], in their dtype), and where the weight (the bias) is trained, its own, summed
    over the chunks in fp32 and cast to its dtype once. With a `softcap` the logits are
    softcap * tanh(logits / softcap) first (Gemma's final soft-capping). `grads`: False where no backward
    follows (an evaluation under no_grad, where autograd's needs_input_grad still says True)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype, softcap, grads):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        needs = [grads and need for need in ctx.needs_input_grad[:3]]
        grad = torch.empty_like(hidden) if needs[0] else None
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32) if needs[1] else None
        grad_b = bias.new_zeros(bias.shape, dtype=torch.float32) if needs[2] else None
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
            if not any(needs):
                continue
            # d(sum of cross-entropy)/d(logits): softmax minus the one-hot label, 0 on ignored rows
            dlogits = torch.softmax(logits, dim=-1)
            valid = y != IGNORE_INDEX
            dlogits.scatter_add_(1, y.clamp(min=0)[:, None], valid[:, None].to(dlogits.dtype).neg())
            dlogits.mul_(valid[:, None])
            if softcap is not None:  # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2
                dlogits.mul_(1 - capped * capped)
            if grad_b is not None:
                grad_b += dlogits.sum(0)
            dlogits = dlogits.to(compute_dtype)
            if grad is not None:
                grad[start : start + step] = linear(pad_tokens(dlogits), w.t())[: h.shape[0]]
            if grad_w is not None:  # the projection's gradient, dlogits^T @ h, as autograd's matmul makes it
                grad_w += token_contraction(dlogits, h).float()
        ctx.save_for_backward(
            grad,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # Scaled in place: a copy would hold a second weight-sized gradient (2 GiB for a 128k x 4096 head in
        # fp32) while autograd hands this one on. A second backward through the same graph (retain_graph)
        # then fails torch's check on a modified saved tensor, instead of scaling twice.
        grads = ctx.saved_tensors
        for g in grads:
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        return *grads, None, None, None, None


def head_loss_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (soft-capped at `softcap`, if given) against `labels`
    ([tokens, hidden], [tokens]), in the dtype an autocast region would use for the projection (else the
    hidden states'); its matmuls on this process's CPU matmul engine (training/kernels/cpu_gemm.py). The
    head's weight and bias get their gradients where they are trained (full fine-tuning), the hidden
    states theirs always."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    grads = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        return _HeadCrossEntropy.apply(hidden, head.weight, head.bias, labels, dtype, softcap, grads)


def _fused_forward(self, *args, logits_to_keep=0, **kwargs):
    labels = kwargs.pop(LABELS, None)
    if labels is None:
        return self._sharpen_full_forward(*args, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    if args or kwargs.pop("labels", None) is not None:
        raise TypeError(f"{LABELS} is for keyword calls without `labels`")
    hidden = slice_logits_to_keep(self.model(**kwargs).last_hidden_state, logits_to_keep)
    if hidden.shape[:-1] != labels.shape:
        raise RuntimeError(f"hidden states of shape {tuple(hidden.shape)} for labels of shape {tuple(labels.shape)}")
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = head_loss_sum(hidden.reshape(-1, hidden.shape[-1]), self.lm_head, labels.reshape(-1), softcap)
    return CausalLMOutputWithPast(loss=loss)


def fuse_head_loss(model: nn.Module) -> bool:
    """Install the fused loss in `model` (any wrapper of a supported causal LM whose lm_head is a plain
    Linear, frozen or trained); returns whether it applies, and where it does not, says why on the rank
    log. The loss asks `fuses_head_loss` before passing LABELS."""
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
    if not hasattr(lm, "_sharpen_full_forward"):
        lm._sharpen_full_forward = lm.forward
        lm.forward = types.MethodType(_fused_forward, lm)
    setattr(model, _MARK, True)
    trained = "its gradient summed in the forward" if lm.lm_head.weight.requires_grad else "frozen"
    log.info("loss: cross-entropy through the output projection (%s) in chunks, no full logits kept", trained)
    return True


def fuses_head_loss(model: nn.Module) -> bool:
    """Whether `model`, or a module it wraps, had fuse_head_loss applied."""
    return any(getattr(module, _MARK, False) for module in model.modules())
