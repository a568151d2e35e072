"""Optional faster paths for library models, each applied by one function and each proven equal to the plain path.

`apply` installs them on a rank's model; the fp32 CPU matmul engine they run on is the job's one choice
(`resolve_cpu_matmul` when planning, `agree_cpu_matmul` on the ranks: the same on every rank). A kernel
that copies or patches library code lists that code in its UPSTREAM, {qualified name: (digest of the
installed source, what of the kernel follows it)}; tests/unit/test_upstream.py fails when the installed
library's source no longer has that digest (`upstream_digest`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from strategies.base import DistEnv, Strategy

log = logging.getLogger(__name__)


def apply(model: nn.Module, strategy: Strategy, *, compiled: bool) -> list[str]:
    """Install on `model` (before `strategy.setup`) every kernel that applies to it; returns their names.

    None where the strategy gathers parameters in module hooks (ZeRO-3): each kernel reads a weight
    without calling the module that owns it. Under torch.compile only the fused loss (the compiler
    fuses and picks kernels for the layers itself). Each kernel checks the model it is given and
    leaves alone what it does not cover (full fine-tuning has no LoRA linears, a model family's layers
    may not be the ones a kernel reproduces); each kernel not applied is one line
    on the rank log saying why (`skipped`)."""
    from training.kernels.cpu_gemm import current_engine, use_onednn_linears
    from training.kernels.fused_loss import fuse_head_loss
    from training.kernels.last_layer import prune_last_layer
    from training.kernels.lora_fused import fuse_lora_linears

    applied: list[str] = []
    target = model_class(model)
    if strategy.gathers_params_in_module_hooks:
        why = "the strategy gathers each weight in its module's hooks, and the kernels read weights directly"
        skipped("fused_loss, lora_fused, last_layer", target, why)
        return applied
    # no full logits for the loss, the output projection frozen (LoRA, QLoRA) or trained (full): SFT, pretraining
    if fuse_head_loss(model):
        applied.append("fused_loss")
    if compiled:
        skipped("lora_fused, last_layer", target, "model.compile compiles the layers, and fuses them itself")
        return applied
    if fuse_lora_linears(model):  # none for full fine-tuning and QLoRA (no plain LoRA linears)
        applied.append("lora_fused")
    if prune_last_layer(model):  # the last layer's MLP at label positions only (SFT, pretraining)
        applied.append("last_layer")
    if current_engine() == "onednn":
        changed = use_onednn_linears(model)
        log.info("fp32 CPU matmuls on oneDNN (%d plain linear layers)", changed)
        applied.append("onednn_linears")
    return applied


def model_class(model: nn.Module) -> str:
    """The class name of the transformers model inside `model` (PEFT's and the strategies' wrappers aside)."""
    from transformers import PreTrainedModel

    return type(next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)).__name__


def skipped(kernel: str, target: str, why: str) -> None:
    """The rank log's one line for a kernel that leaves `target` (a model class) alone, and why."""
    log.info("kernel %s not applied to %s: %s", kernel, target, why)


def resolve_cpu_matmul(
    requested: str, device: str, compute_dtype: str, threads: int | None, cache: Path | None = None
) -> str | None:
    """The engine ("aten" or "onednn") for the job key model.cpu_matmul (auto | aten | onednn): aten
    where oneDNN has no say (a GPU, a dtype but fp32, no usable oneDNN), the one asked for, or for auto
    the faster one on this machine at `threads` threads a rank (measured once, training/flops.py).
    None for auto when `threads` is None: the ranks run on machines this process does not see."""
    import torch

    from training.kernels.cpu_gemm import faster_engine, onednn_available

    if device != "cpu" or compute_dtype != "fp32":
        return "aten"
    if requested == "auto":
        if threads is None:
            return None
        from training.flops import cpu_engine_rates

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)  # the measured rates are those of a rank, keyed by its thread count
        try:
            return faster_engine(cpu_engine_rates(cache))
        finally:
            torch.set_num_threads(saved)
    if requested == "onednn" and not onednn_available():
        log.warning("model.cpu_matmul is onednn, but this torch has no usable oneDNN linear: using aten")
        return "aten"
    return requested


def agree_cpu_matmul(
    planned: str | None, requested: str, compute_dtype: str, env: DistEnv, cache: Path | None = None
) -> str:
    """Set this rank's CPU matmul engine to the job's and return it: the plan's, or where the plan left
    it open (auto, planned away from the ranks' machines) rank 0's choice, broadcast to every rank. A
    collective then: every rank calls it, before the first forward."""
    import torch
    import torch.distributed as dist

    from training.kernels.cpu_gemm import onednn_available, set_engine

    engine = planned
    if engine is None:
        if env.is_main:
            engine = resolve_cpu_matmul(requested, env.device.type, compute_dtype, torch.get_num_threads(), cache)
        if env.world_size > 1:
            box = [engine]
            dist.broadcast_object_list(box, src=0)
            engine = box[0]
    if engine == "onednn" and not onednn_available():
        log.warning("the job's CPU matmul engine is onednn, but this rank's torch has no usable oneDNN linear: aten")
        engine = "aten"
    set_engine(engine)
    if env.device.type == "cpu":
        how = "decided when planning" if planned is not None else "rank 0's choice, the same on every rank"
        log.info("CPU matmul engine: %s (model.cpu_matmul: %s; %s)", engine, requested, how)
    return engine


def upstream_digest(qualified_name: str) -> str:
    """A short hash of the installed source of `qualified_name` (package.module.Class.attribute), as code:
    its docstrings, comments and layout left out, so only a change of what it does changes the hash."""
    parts = qualified_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
            break
        except ModuleNotFoundError:
            continue
    else:
        raise ModuleNotFoundError(f"no module of {qualified_name} is installed")
    for attribute in parts[split:]:
        obj = getattr(obj, attribute)
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]
