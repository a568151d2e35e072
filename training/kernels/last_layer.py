"""The last decoder layer's MLP at the label positions only: the rest of its output is never read.

A causal LM's loss reads the final hidden states only where a token has a label (training/methods/causal_lm.py
already computes the logits there alone). Attention still needs every position of the last layer (its
keys and values), but everything after it -- the residual add, the post-attention norm and the MLP --
is per position, so at positions without a label it computes values nothing reads, and its backward
returns zeros for them. With loss on completions only, most positions are prompt (80% on the CPU bench
job), and the MLP is most of a layer's matmuls (73% in a Llama layer). So the last layer runs attention
over the whole row, keeps the label positions, and runs its MLP on those: the same loss and gradients,
one layer's MLP less of the work times the prompt share. Worth most on shallow models: 1/L of the layers.

How: the loss passes the positions as the model-forward keyword LABEL_POSITIONS (transformers passes
keywords through to every decoder layer) and asks for all logits of what comes out; every decoder
layer's forward is replaced, the last one by `_pruned_forward`, the others only drop the keyword. Only
for decoder layers whose forward is exactly Llama's (SUPPORTED); others are left alone and the loss
keeps logits_to_keep alone. Not for mixture-of-experts layers even where their forward is Llama's
(Qwen3-MoE, OLMoE): the router's load-balancing loss is computed from the router logits of every token,
and routing the label positions alone would change it. Not under torch.compile (the compiled layers
keep their own forward).
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

LABEL_POSITIONS = "sharpen_label_positions"
# transformers 5's decoder layers whose forward is Llama's: norm, attention, residual, norm, MLP, residual.
SUPPORTED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_MOE = (
    "a mixture-of-experts layer: its router's load-balancing loss is computed from the router logits of every "
    "token, and routing only the label positions through its experts would change it"
)
# Why the decoder layers of these classes keep their forward (the rank log says so); other classes than
# SUPPORTED: their forward is not Llama's.
NOT_SUPPORTED = {
    "Phi3DecoderLayer": "its forward is not Llama's (dropout on both residual branches)",
    "Gemma3DecoderLayer": "its forward is not Llama's (sandwich norms: after attention and around the MLP)",
    "Gemma2DecoderLayer": "its forward is not Llama's (sandwich norms: after attention and around the MLP)",
    "MixtralDecoderLayer": _MOE,
    "Qwen3MoeDecoderLayer": _MOE,
    "OlmoeDecoderLayer": _MOE,
}
_MARK = "_sharpen_prunes_last_layer"
# The library code copied here (training/kernels/__init__.py): the SUPPORTED layers' forward, which
# _pruned_body is, and the gradient checkpointing wrapper of their class forward, which _pruned_forward is.
UPSTREAM = {
    **{
        f"transformers.models.{name.lower()}.modeling_{name.lower()}.{name}DecoderLayer.forward": (
            "b555e7652f3e4349",
            "_pruned_body in training/kernels/last_layer.py is this forward with the label positions kept after "
            "attention (and SUPPORTED holds only layers whose forward is Llama's)",
        )
        for name in ("Llama", "Mistral", "Qwen2", "Qwen3")
    },
    "transformers.modeling_layers.GradientCheckpointingLayer.__init_subclass__": (
        "5b74941eccaae1dd",
        "_pruned_forward in training/kernels/last_layer.py checkpoints the pruned body as this wrapper "
        "checkpoints the class forward it replaces (the cache arguments it drops, when it checkpoints)",
    ),
}


def _pruned_forward(self, hidden_states, *args, **kwargs):
    positions = kwargs.pop(LABEL_POSITIONS, None)
    if positions is None:
        return self._full_forward(hidden_states, *args, **kwargs)
    # As transformers' GradientCheckpointingLayer does for its class forward, which this one replaces.
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        kwargs.update(use_cache=False, cache=None)
        body = functools.partial(_pruned_body, self, positions, **kwargs)
        return self._gradient_checkpointing_func(body, hidden_states, *args)
    return _pruned_body(self, positions, hidden_states, *args, **kwargs)


def _pruned_body(
    self, positions, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
    position_embeddings=None, **kwargs,
):
    """transformers' Llama decoder layer forward, with the positions kept after attention."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
        use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
    )
    hidden_states = residual[:, positions] + hidden_states[:, positions]
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _passing_forward(self, *args, **kwargs):
    kwargs.pop(LABEL_POSITIONS, None)
    return self._full_forward(*args, **kwargs)


def _decoder_layers(model: nn.Module) -> tuple[nn.ModuleList | None, str, str]:
    """The decoder layers to prune, or None, the class they are not pruned in and why."""
    from strategies.base import decoder_layer_classes

    classes = decoder_layer_classes(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and isinstance(module[0], classes):
            name = type(module[0]).__name__
            if name not in SUPPORTED:
                return None, name, NOT_SUPPORTED.get(name, "its forward is not Llama's")
            if not all(type(layer) is type(module[0]) for layer in module):
                return None, name, "its model mixes it with other decoder layer classes"
            return module, name, ""
    from training.kernels import model_class

    return None, model_class(model), "no decoder layers found (none of the classes its _no_split_modules names)"


def prune_last_layer(model: nn.Module) -> bool:
    """Install the pruned last layer in `model` (any wrapper of a transformers causal LM); returns whether
    it applies, and where it does not, says why on the rank log. The loss asks `prunes_last_layer` before
    passing positions."""
    layers, target, why = _decoder_layers(model)
    if layers is None:
        from training.kernels import skipped

        skipped("last_layer", target, why)
        return False
    for i, layer in enumerate(layers):
        if not hasattr(layer, "_full_forward"):
            layer._full_forward = layer.forward
            layer.forward = types.MethodType(_pruned_forward if i == len(layers) - 1 else _passing_forward, layer)
    setattr(model, _MARK, True)
    log.info("last decoder layer: its MLP runs at label positions only")
    return True


def prunes_last_layer(model: nn.Module) -> bool:
    """Whether `model`, or a module it wraps, had prune_last_layer applied."""
    return any(getattr(module, _MARK, False) for module in model.modules())


def label_positions_kwargs(columns: torch.Tensor) -> dict:
    """Model-forward keywords for a pruned model: the positions, and every logit of what comes out."""
    return {LABEL_POSITIONS: columns, "logits_to_keep": 0}
