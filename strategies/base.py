"""The strategy interface: how a model is placed, stepped, saved and gathered on each rank.

The training loop talks to a model only through this class and never asks which strategy it has.
strategies/ imports nothing from training/.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from strategies.activation_checkpointing import checkpoint_kwargs, offload_checkpointed_inputs

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
"""Builds the optimizer from parameters (or param groups) *after* the strategy has wrapped the model."""

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its ranks, its device and the collective backend."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class StrategyOptions:
    """What a strategy needs from the job, already resolved by the plan."""

    compute_dtype: torch.dtype = torch.float32  # bf16 on GPU (mixed precision), fp32 on CPU
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3 like)
    gradient_checkpointing: str = "none"  # none | selective | full | offload (strategies/activation_checkpointing.py)


class Strategy(ABC):
    """One way of placing a model across ranks. Create, `setup`, then train through these methods.

    Loss scaling contract: every strategy *averages* gradients over its data-parallel ranks (as DDP,
    FSDP2 and ZeRO all do), so the loop passes `backward` a loss already multiplied by world size and
    divided by the global count of label tokens of the whole step. No strategy rescales the loss for
    gradient accumulation: the loop's normalisation already covers it.
    """

    name: str = "base"
    # True where parameters are gathered in the forward hooks of the modules that own them (ZeRO-3): then
    # nothing may read a submodule's weight without calling that submodule (training/kernels/lora_fused.py
    # does).
    gathers_params_in_module_hooks: bool = False
    # True where a forward is itself a collective (FSDP2 and ZeRO-3 gather parameters in it): every rank must
    # then run as many forwards, so anything that runs forwards of its own (GRPO's generation) keeps step.
    collective_forward: bool = False

    def __init__(self, options: StrategyOptions, env: DistEnv):
        if options.compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"{self.name}: compute dtype {options.compute_dtype} is not supported (fp32 or bf16; "
                "fp16 would need a loss scaler)"
            )
        self.options = options
        self.env = env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # -- placing ---------------------------------------------------------------------------------
    @abstractmethod
    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        """Wrap or shard `model`, then build its optimizer and LR scheduler over the trainable params."""

    def prepare_model(self, model: nn.Module, *, upcast_trainable: bool = True) -> None:
        """What every strategy's setup does to the model first, before any wrapping: activation checkpointing
        (module flags FSDP2 and ZeRO-3 must find set when they wrap) and fp32 trainable params (AdamW's
        master weights; a strategy that keeps fp32 masters itself passes upcast_trainable=False)."""
        if self.options.gradient_checkpointing != "none":
            enable_gradient_checkpointing(model, self.options.gradient_checkpointing)
        if upcast_trainable:
            upcast_trainable_to_fp32(model)

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """`model` frozen and placed as this strategy places the policy, for no-grad forwards beside it
        (GRPO's reference under full fine-tuning). Here: whole on this rank's device (single, ddp, and
        zero1/2, which shard no parameters); fsdp and zero3 shard it as they shard the policy."""
        model.requires_grad_(False)
        return model.to(self.env.device).eval()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[bool]:
        """The whole model on every rank for a span of no-grad forwards (a rollout): one gather for all
        of them instead of one per forward where the strategy shards parameters. Yields whether a forward
        inside is still a collective (then every rank must run as many). Here: nothing to gather."""
        yield self.collective_forward

    def unwrap(self) -> nn.Module:
        """The user's module (a transformers or PEFT model) under whatever wrapper this strategy added."""
        assert self.model is not None
        return getattr(self.model, "module", self.model)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (autocast where the strategy does mixed precision that way)."""
        return contextlib.nullcontext()

    # -- stepping --------------------------------------------------------------------------------
    def accumulate(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Context around forward+backward of one micro-step: skips gradient sync unless it is the last."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an already-normalised loss (see the class docstring)."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip to `max_grad_norm`, step optimizer and scheduler, zero grads. Returns the pre-clip grad norm
        as a 0-d tensor (not synced to host, so reading it is the caller's choice)."""

    def current_lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints -----------------------------------------------------------------------------
    @abstractmethod
    def save_checkpoint(self, directory: Path) -> None:
        """Write model (trainable part only when some params are frozen), optimizer and scheduler state
        into `directory`. Called on every rank; each rank writes its shard."""

    @abstractmethod
    def load_checkpoint(self, directory: Path) -> None:
        """Load what `save_checkpoint` wrote (possibly by another world size where the format allows)."""

    @abstractmethod
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Gather full (unsharded) fp32 CPU tensors keyed like `unwrap().state_dict()`.
        A collective: every rank must call it; rank 0 gets the dict, the others None."""

    # -- measuring -------------------------------------------------------------------------------
    @abstractmethod
    def local_state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds on its own
        (local shards only), as {"params", "grads", "optimizer"}."""

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.env.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier()

    def teardown(self) -> None:
        """Free what setup took (engines, process groups it made). Subclasses that hold more call this."""
        self.release_process_group()

    _own_process_group = False

    def ensure_process_group(self) -> None:
        """DDP and DeepSpeed need a process group even on one rank, where the launcher starts none: make a
        world of one on an in-memory store (no rendezvous), which teardown destroys."""
        if self.env.world_size == 1 and not dist.is_initialized():
            dist.init_process_group(self.env.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_process_group = True

    def release_process_group(self) -> None:
        if self._own_process_group:
            dist.destroy_process_group()
            self._own_process_group = False


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def has_frozen_parameters(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of local storage of `tensors` (a DTensor counts its local shard only), each byte once.

    Counts the union of the memory ranges the tensors cover: tied params (one tensor twice) count
    once, and views into one flat buffer (ZeRO's flat partitions, FSDP2 and DDP gradient buckets)
    each count their own slice, not the first view's size for the whole buffer."""
    ranges: list[tuple[str, int, int]] = []  # (device, first byte, end): devices have separate addresses
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel() == 0:
            continue
        extent = 1 + sum(
            (size - 1) * stride for size, stride in zip(local.shape, local.stride(), strict=True)
        )
        start = local.data_ptr()
        if start == 0:  # no real memory to overlap with (meta, fake): count as is
            total += extent * local.element_size()
            continue
        ranges.append((str(local.device), start, start + extent * local.element_size()))
    device, end = "", 0
    for dev, start, stop in sorted(ranges):
        if dev != device:
            device, end = dev, 0
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


# -- helpers shared by the strategies (added with single/ddp/fsdp/deepspeed) ---------------------
def cpu_fp32_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached fp32 copy on CPU that never aliases live parameter storage."""
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def upcast_trainable_to_fp32(model: nn.Module) -> None:
    """Keep trainable params in fp32 (AdamW master weights); frozen ones stay as loaded (e.g. bf16, 4-bit)."""
    for param in trainable_parameters(model):
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def enable_gradient_checkpointing(model: nn.Module, mode: str) -> None:
    """Activation checkpointing of every decoder layer of a transformers (or PEFT) model, `full`,
    `selective` or `offload` (strategies/activation_checkpointing.py); idempotent.

    Checkpointing is non-reentrant, so a layer whose input needs no gradient (LoRA over frozen embeddings,
    QLoRA) still gives its adapters theirs; transformers also hooks the embeddings to make their output
    require grad, as PEFT does."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    enable(gradient_checkpointing_kwargs=checkpoint_kwargs(mode))
    if mode == "offload" and not offload_checkpointed_inputs(model):
        raise TypeError(f"{type(model).__name__} has no checkpointed layers whose inputs could be offloaded")


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """Classes of the repeated blocks (decoder layers), from transformers' `_no_split_modules`: what FSDP2
    shards one by one and model.compile compiles one by one. Empty for a model that names none."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    return tuple(sorted(classes, key=lambda c: c.__name__))


def moe_block_classes(model: nn.Module) -> tuple[type, ...]:
    """Classes of the sparse MoE blocks: a router `gate` beside an `experts` module holding 3D weights
    (transformers 5's Mixtral, Qwen3-MoE, OLMoE). ZeRO-3 treats each as one leaf, gathering the block's
    parameters once however its tokens are routed. Empty for a dense model."""
    classes = set()
    for module in model.modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if isinstance(gate, nn.Module) and isinstance(experts, nn.Module):
            if any(param_dims(p) == 3 for p in experts.parameters()):
                classes.add(type(module))
    return tuple(sorted(classes, key=lambda c: c.__name__))


def param_dims(param: nn.Parameter) -> int:
    """A parameter's number of dimensions as the model defines it, also once ZeRO-3 has partitioned it
    (its local tensor is then flat; `ds_shape` keeps the shape)."""
    return len(getattr(param, "ds_shape", param.shape))


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensor shards are reduced over their mesh), then clip in place.

    Returns the pre-clip norm as a 0-d tensor. Clipping is skipped when `max_norm` is None."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):  # a DTensor norm is a partial (per-shard) result until reduced
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.detach()


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict keys of the trainable params, tied aliases included."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of a torch optimizer's per-param state (AdamW: exp_avg, exp_avg_sq, step)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
