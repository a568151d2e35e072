"""Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): the router's load-balancing loss, and LoRA on the
experts' weights.

transformers 5 keeps each layer's experts as one module holding 3D parameters ([experts, out, in]), not one
nn.Linear per expert, so LoRA reaches them through PEFT's `target_parameters` (a low-rank update per
expert), never through `target_modules`. sharpen's `finetune.target_modules` takes both: a name that is a
linear layer is a module target, a name that is an experts module (`experts`) or one of its parameters
(`gate_up_proj`, `down_proj` in the MoE layers) is a parameter target (`lora_targets`).

The load-balancing loss is the model family's own `load_balancing_loss_func` (the one its forward calls
with `output_router_logits`) over every layer's router logits, a mean over the micro-batch's real tokens.
The logits are caught by forward hooks on the routers (`RouterLoss`), not asked of the forward: transformers
hands that function the attention mask, which for packed rows is a 4D block mask it cannot read. causal_lm adds
`coefficient * aux_loss` weighted by the micro-batch's label tokens, so after the step's division by its
global label count the term is the label-weighted mean over micro-batches: the same whatever the split
over ranks and micro-steps, as the cross-entropy is.
"""

from __future__ import annotations

import fnmatch
import sys

import torch
from torch import nn

from strategies.base import moe_block_classes, param_dims


def config_is_moe(config) -> bool:
    """Whether a transformers config describes a model with routed experts and a load-balancing loss."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return bool(experts) and hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")


def base_config(model: nn.Module):
    """The config of the outermost transformers model under `model`'s wrappers (DDP, PEFT, DeepSpeed)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module.config
    return None


def router_aux_coefficient(model: nn.Module) -> float | None:
    """The load-balancing loss coefficient of an MoE model (its config's, which model.router_aux_loss_coef
    overrides at load), None for a model without routed experts. 0 means the loss is not added."""
    config = base_config(model)
    if config is None or not config_is_moe(config):
        return None
    return float(config.router_aux_loss_coef)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of every experts module: one holding 3D parameters directly (its experts' weights)."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(param_dims(p) == 3 for p in module.parameters(recurse=False))
    }


def lora_targets(model: nn.Module, names: str | list[str]) -> tuple[str | list[str], list[str]]:
    """finetune.target_modules split into PEFT's (target_modules, target_parameters) for `model`.

    "all-linear" stays PEFT's all-linear (the experts' 3D weights are no linear layers). Each listed name
    that is an experts module (its last name component, e.g. `experts`) becomes every 3D parameter of it;
    one that names a 3D parameter of an experts module (`gate_up_proj`) becomes that parameter; the rest
    stay module names (a dense layer's `down_proj`, in Qwen3-MoE's mlp_only_layers, is still a module)."""
    if isinstance(names, str):
        return names, []
    experts = experts_modules(model)
    parameters: set[str] = set()
    for name in names:
        for module_name, module in experts.items():
            leaf = module_name.rsplit(".", 1)[-1]
            for param_name, param in module.named_parameters(recurse=False):
                if param_dims(param) != 3:
                    continue
                if name == leaf or fnmatch.fnmatchcase(leaf, name) or name in (param_name, f"{leaf}.{param_name}"):
                    parameters.add(f"{leaf}.{param_name}")
    covered = {p.rsplit(".", 1)[0] for p in parameters} | {p.rsplit(".", 1)[1] for p in parameters}
    modules = [n for n in names if n not in covered or _is_linear_name(model, n)]
    return modules, sorted(parameters)


def _is_linear_name(model: nn.Module, name: str) -> bool:
    return any(
        isinstance(m, nn.Linear) and (n == name or n.endswith("." + name)) for n, m in model.named_modules()
    )


class RouterLoss:
    """The load-balancing loss of an MoE model's last forward, from its routers' logits.

    Forward hooks on each MoE block's router (`gate`) keep the logits of the forward in flight; `loss`
    takes them (the same function, experts and top-k the model's own forward would use). A recomputed
    forward (activation checkpointing, in the backward) adds logits that the next `clear` drops."""

    def __init__(self, model: nn.Module, config):
        self.num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        self.top_k = config.num_experts_per_tok
        base = next(m for m in model.modules() if getattr(m, "config", None) is config)
        self._function = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
        if self._function is None:  # a family without its own copy: Mixtral's, which the others copy
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            self._function = load_balancing_loss_func
        self._logits: list[torch.Tensor] = []
        classes = moe_block_classes(model)
        self.routers = [m.gate for m in model.modules() if isinstance(m, classes)] if classes else []
        if not self.routers:
            raise RuntimeError(f"{type(base).__name__}: a mixture-of-experts config, but no MoE block with a router found")
        for router in self.routers:
            router.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._logits.append(output[0] if isinstance(output, tuple) else output)

    def clear(self) -> None:
        self._logits.clear()

    def loss(self, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The aux loss over the routers' logits since `clear` (one forward): `padding_mask` [rows, T] marks
        the real tokens of a padded batch, None for a padding-free row."""
        if len(self._logits) != len(self.routers):
            raise RuntimeError(f"{len(self._logits)} router outputs for {len(self.routers)} routers in one forward")
        logits, self._logits = tuple(self._logits), []
        return self._function(logits, self.num_experts, self.top_k, padding_mask)


def router_loss(model: nn.Module) -> RouterLoss | None:
    """A RouterLoss on `model`, None for a model without routed experts."""
    config = base_config(model)
    if config is None or not config_is_moe(config):
        return None
    return RouterLoss(model, config)
