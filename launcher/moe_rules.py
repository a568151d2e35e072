"""What a job asks of a model's layers, checked against the model's config before any rank starts: LoRA
targets that name nothing, the router settings of a model without experts, and what PEFT cannot do on the
experts' 3D weights (dropout, DoRA). Each problem is (job key, message with the fix), as job_problems'."""

from __future__ import annotations

from launcher.method_spec import ROUTER_LOSS_METHODS
from launcher.spec import JobSpec


def layer_problems(spec: JobSpec, config) -> list[tuple[str, str]]:
    """Problems of `spec` with the model of `config` (its transformers config)."""
    from training.moe import config_is_moe

    problems: list[tuple[str, str]] = []
    moe = config_is_moe(config)
    kind = getattr(config, "model_type", "this model")
    if spec.model.router_aux_loss_coef is not None and not moe:
        problems.append(
            ("model.router_aux_loss_coef", f"{kind} has no router (not a mixture-of-experts model); remove the key")
        )
    elif spec.model.router_aux_loss_coef is not None and spec.method.kind not in ROUTER_LOSS_METHODS:
        problems.append(
            (
                "model.router_aux_loss_coef",
                f"method {spec.method.kind} trains without the router's load-balancing loss (only "
                f"{' and '.join(ROUTER_LOSS_METHODS)} add it); remove the key",
            )
        )
    ft = spec.finetune
    if ft.type == "full":
        return problems
    if isinstance(ft.target_modules, str):  # all-linear: PEFT's, which reaches an MoE model's experts and routers
        parameters, targeted = [], "all-linear reaches the experts' 3D weights and the routers"
        if moe:
            problems += _expert_problems(ft, targeted, "or name only linear layers in target_modules, e.g. [q_proj, k_proj, v_proj, o_proj]")
        return problems
    modules, parameters, layer_names = _targets(config, tuple(ft.target_modules), spec.model.trust_remote_code)
    unknown = [n for n in modules if not _names_layer(n, layer_names)]
    if unknown:
        experts = " (or experts, the experts' weights)" if moe else ""
        problems.append(
            (
                "finetune.target_modules",
                f"{', '.join(map(repr, unknown))} names no layer of {kind} LoRA can adapt; its layers are "
                f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in layer_names}))}{experts}, or use all-linear",
            )
        )
    if parameters:
        targeted = f"target_modules names the experts' 3D weights ({', '.join(parameters)})"
        problems += _expert_problems(ft, targeted, "or leave the experts out of target_modules")
    return problems


def _expert_problems(ft, targeted: str, instead: str) -> list[tuple[str, str]]:
    """What PEFT's LoRA on parameters (target_parameters: the experts' 3D weights) cannot do: dropout, DoRA."""
    problems = []
    if ft.dropout:
        why = f"{ft.dropout} with LoRA on the experts: PEFT cannot apply dropout to them ({targeted})"
        problems.append(("finetune.dropout", f"{why}; set finetune.dropout: 0, {instead}"))
    if ft.use_dora:
        why = f"PEFT has no DoRA for the experts' weights ({targeted})"
        problems.append(("finetune.use_dora", f"{why}; set use_dora: false, {instead}"))
    return problems


def _names_layer(name: str, layer_names: tuple[str, ...]) -> bool:
    """As PEFT matches a target_modules entry: the module's full name, or its name's last components."""
    return any(full == name or full.endswith("." + name) for full in layer_names)


def _targets(config, names: tuple[str, ...], trust_remote_code: bool) -> tuple[list, list, tuple[str, ...]]:
    """(module targets, expert parameter targets, names of every layer PEFT's LoRA adapts: linear, embedding,
    convolution) of the model on the meta device."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from training.moe import lora_targets

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules, parameters = lora_targets(model, list(names))
    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    layers = tuple(n for n, m in model.named_modules() if isinstance(m, kinds))
    return list(modules), parameters, layers
