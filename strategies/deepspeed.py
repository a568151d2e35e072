"""DeepSpeed ZeRO stages 1-3 (optimizer state, + gradients, + parameters partitioned), optional CPU offload."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import UserError
from strategies import deepspeed_universal
from strategies.base import (
    DistEnv,
    OptimizerFactory,
    SchedulerFactory,
    Strategy,
    StrategyOptions,
    cpu_fp32_copy,
    has_frozen_parameters,
    moe_block_classes,
    tensor_bytes,
    trainable_names,
    trainable_parameters,
)
from strategies.deepspeed_sizes import PREFETCH_SHARE, persistence_threshold, reduce_bucket

log = logging.getLogger("sharpen")

CHECKPOINT_TAG = "deepspeed"
LAYOUT_FILE = "deepspeed-layout.json"
KIND = f"a DeepSpeed ({LAYOUT_FILE})"  # how strategies/full_weights.py names this format


class DeepSpeedStrategy(Strategy):
    """deepspeed.initialize over the loop's own torch AdamW and LR scheduler (a "client" optimizer).

    Accumulation: DeepSpeed would divide every loss by gradient_accumulation_steps and decide the
    boundary from its own micro-step counter. Here `backward` passes scale_wrt_gas=False (the loop's
    loss is already normalised by the step's global label tokens) and `accumulate` sets the boundary
    explicitly, so `step` is called once per optimizer step, after the last micro-step.
    Mixed precision: with bf16 compute DeepSpeed keeps bf16 module params and fp32 master partitions
    inside its ZeRO optimizer; the forward needs no autocast."""

    def __init__(self, options: StrategyOptions, env: DistEnv, stage: int):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
        self.stage = stage
        self.name = f"zero{stage}"
        super().__init__(options, env)
        if options.offload_params and stage != 3:
            raise ValueError(
                f"zero{stage}: parameter offload needs ZeRO stage 3 (use zero3 or offload the optimizer)"
            )
        self.gathers_params_in_module_hooks = stage == 3
        self.collective_forward = stage == 3
        self._frozen_engines: list[Any] = []  # engines of frozen copies (zero3): kept alive with the strategy
        self.engine: Any = None
        self._last_backward_at_boundary = False

    def deepspeed_config(self, hidden_size: int | None = None) -> dict[str, Any]:
        """The DeepSpeed JSON, generated: nothing a user writes by hand. Bucket sizes follow the model
        width (strategies/deepspeed_sizes.py, which the footprint counts too); DeepSpeed's own defaults
        when the width is unknown."""
        o = self.options
        pin = self.env.device.type == "cuda"
        zero: dict[str, Any] = {"stage": self.stage}
        if hidden_size:
            zero["reduce_bucket_size"] = reduce_bucket(hidden_size)
            if self.stage == 3:
                zero["stage3_prefetch_bucket_size"] = int(PREFETCH_SHARE * reduce_bucket(hidden_size))
                zero["stage3_param_persistence_threshold"] = persistence_threshold(hidden_size)
        if o.offload_optimizer or o.offload_params:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if o.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        return {
            "train_micro_batch_size_per_gpu": o.micro_batch_size,
            "gradient_accumulation_steps": o.gradient_accumulation_steps,
            "train_batch_size": o.micro_batch_size * o.gradient_accumulation_steps * self.env.world_size,
            "gradient_clipping": float(o.max_grad_norm or 0.0),
            "bf16": {"enabled": o.compute_dtype == torch.bfloat16},
            "zero_optimization": zero,
            # The loop's torch AdamW is the optimizer (also when offloaded: it then steps on CPU).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> None:
        import deepspeed

        # With bf16 DeepSpeed casts every param to bf16 and keeps fp32 masters itself: no upcast first.
        self.prepare_model(model, upcast_trainable=self.options.compute_dtype == torch.float32)
        # The caller owns the process group; with one already initialised this only wraps it.
        self.ensure_process_group()
        deepspeed.init_distributed(dist_backend=self.env.backend, dist_init_required=False)
        # DeepSpeed picks its device from the LOCAL_RANK variable (and asserts it is set), whatever
        # launcher started us: make it say what DistEnv says.
        os.environ["LOCAL_RANK"] = str(self.env.local_rank)
        optimizer = make_optimizer(trainable_parameters(model))
        scheduler = make_scheduler(optimizer)
        self.mark_moe_leaves(model)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.deepspeed_config(getattr(getattr(model, "config", None), "hidden_size", None)),
        )
        self.model = self.engine

    def mark_moe_leaves(self, model: nn.Module) -> None:
        """ZeRO-3: each sparse MoE block is one leaf (deepspeed.utils.set_z3_leaf_modules), its router and
        every expert gathered at the block's entry. Otherwise stage 3 hooks each submodule, and a rank whose
        tokens reach no expert of a block would skip that expert's gather and reduce while another rank
        does not: the ranks' collectives diverge and the step hangs."""
        classes = moe_block_classes(model)
        if self.stage != 3 or not classes:
            return
        from deepspeed.utils import set_z3_leaf_modules

        leaves = set_z3_leaf_modules(model, list(classes))
        log.info("zero3: %d MoE blocks (%s) are leaf modules", len(leaves), ", ".join(c.__name__ for c in classes))

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """ZeRO-1/2 shard no parameters: the copy is whole on the device. ZeRO-3 partitions it as the policy
        through an engine without an optimizer (DeepSpeed's inference mode of stage 3); its module, whose
        hooks gather each layer's parameters in the forward, is what is returned."""
        if self.stage != 3:
            return super().frozen_copy(model)
        import deepspeed

        model.requires_grad_(False)
        self.mark_moe_leaves(model)
        config = self.deepspeed_config(getattr(getattr(model, "config", None), "hidden_size", None))
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        self._frozen_engines.append(engine)
        return engine.module.eval()

    @contextlib.contextmanager
    def gathered(self):
        """ZeRO-3: every parameter gathered once (GatheredParameters) and the module hooks that would gather
        and release them per module taken off for the span, then put back with the coordinator's trace
        invalidated (the forwards inside ran another module order), as TRL's unwrap_model_for_generation
        does with DeepSpeed 0.19. Stages 1-2 hold whole parameters already."""
        if self.stage != 3:
            yield False
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload
        module = offload.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for param in module.parameters():
                param.ds_active_sub_modules.clear()
            for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield False
            finally:
                coordinator = offload.param_coordinator
                if not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                offload._register_deepspeed_module(module)

    def accumulate(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Tells ZeRO whether this backward ends the step (it reduces / finalises partitions then)."""
        self.engine.set_gradient_accumulation_boundary(is_last_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._last_backward_at_boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        if not self._last_backward_at_boundary:
            raise RuntimeError(
                f"{self.name}: step() after a backward that was not marked last: wrap each micro-step in "
                "strategy.accumulate(is_last_micro_step) so ZeRO reduces the gradients before the update"
            )
        self.engine.step()  # clip, optimizer step, LR scheduler step, zero grads
        self._last_backward_at_boundary = False
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().float().reshape(())
        return torch.tensor(float(norm if norm is not None else 0.0))

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> None:
        """DeepSpeed's own layout under `directory/deepspeed/`: module states (rank 0) and one ZeRO
        optimizer partition file per rank; the LR scheduler state rides in the module states file."""
        directory = Path(directory)
        self.engine.save_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            save_latest=False,
            exclude_frozen_parameters=has_frozen_parameters(self.unwrap()),
        )
        if self.env.is_main:
            layout = {"stage": self.stage, "world_size": self.env.world_size}
            (directory / LAYOUT_FILE).write_text(json.dumps(layout) + "\n")
        self.barrier()

    def load_checkpoint(self, directory: Path) -> None:
        """Load what `save_checkpoint` wrote. Another world size (or ZeRO-1 <-> ZeRO-2) goes through
        DeepSpeed's universal checkpoint, converted once into `directory/universal/` by rank 0."""
        directory = Path(directory)
        layout_file = directory / LAYOUT_FILE
        if not layout_file.is_file():
            raise FileNotFoundError(
                f"{directory} holds no DeepSpeed checkpoint written by sharpen ({LAYOUT_FILE})"
            )
        layout = json.loads(layout_file.read_text())
        saved = f"zero{layout['stage']} on {layout['world_size']} ranks"
        if layout == {"stage": self.stage, "world_size": self.env.world_size}:
            self._load(directory)
            return
        if 3 in (layout["stage"], self.stage) and layout["stage"] != self.stage:
            raise ValueError(
                f"{directory} was written by {saved}; this run is {self.name} on {self.env.world_size} "
                "ranks. DeepSpeed's universal checkpoint moves ZeRO-3 checkpoints to ZeRO-3 only and "
                f"ZeRO-1/2 ones to ZeRO-1/2 (on any number of ranks): resume with strategy.name: "
                f"zero{layout['stage']}"
            )
        log.info("%s was written by %s: loading it through a universal checkpoint", directory, saved)
        universal = deepspeed_universal.convert_on_main_rank(
            directory, CHECKPOINT_TAG, self.env.is_main, self.barrier
        )
        with deepspeed_universal.loading_universal(self.engine):
            self._load(universal)

    def _load(self, directory: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_module_strict=not has_frozen_parameters(self.unwrap()),
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / CHECKPOINT_TAG}")

    # -- gathering and measuring -----------------------------------------------------------------
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Trainable params come from the fp32 master partitions (exact even when the module is bf16);
        frozen ZeRO-3 params are gathered from their bf16/fp32 partitions. One tensor at a time."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap()
        names = trainable_names(module) if trainable_only else None
        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}  # tied params are gathered once
        for key, value in module.state_dict(keep_vars=True).items():
            if names is not None and key not in names:
                continue
            if not isinstance(value, nn.Parameter):
                out[key] = cpu_fp32_copy(value)
                continue
            if id(value) not in gathered:
                full = safe_get_full_fp32_param(value) if value.requires_grad else None
                if full is not None:
                    full = cpu_fp32_copy(full) if self.env.is_main else None
                else:  # copy inside the context: leaving it frees the gathered ZeRO-3 storage
                    with deepspeed.zero.GatheredParameters(
                        [value], modifier_rank=None, enabled=self.stage == 3
                    ):
                        full = cpu_fp32_copy(value.data) if self.env.is_main else None
                gathered[id(value)] = full if full is not None else torch.empty(0)
            out[key] = gathered[id(value)]
        return out if self.env.is_main else None

    def local_state_bytes(self) -> dict[str, int]:
        """This rank's real storage, read from the ZeRO optimizer's buffers (names of DeepSpeed 0.19):

        params: the module's params (ZeRO-1/2: full, one flat buffer; ZeRO-3: this rank's partitions
        plus whatever is gathered now, e.g. params under the persistence threshold).
        grads: grads on the module (accumulating micro-steps) plus the reduced fp32 grad partitions.
        optimizer: the fp32 master partitions plus AdamW state. Offloaded ones count too (host memory)."""
        zero = self.engine.optimizer
        params = list(self.unwrap().parameters())
        param_tensors: list[torch.Tensor] = list(params)
        grads: list[torch.Tensor] = [p.grad for p in params]
        if self.stage == 3:
            param_tensors += [p.ds_tensor for p in params]
            masters = list(zero.fp32_partitioned_groups_flat)
            grads.append(getattr(zero, "grad_partitions_flat_buffer", None))
        else:
            masters = list(zero.single_partition_of_fp32_groups)
        grads += [m.grad for m in masters]
        grads += [g for group in _values(zero.averaged_gradients) for g in (group or ())]
        state = [v for s in zero.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return {
            "params": tensor_bytes(param_tensors),
            "grads": tensor_bytes(grads),
            "optimizer": tensor_bytes(masters + state),
        }

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        self.release_process_group()


def _values(container: Any) -> list[Any]:
    """ZeRO keeps per-group buffers in a dict (stage 1/2) or a list (stage 3)."""
    return list(container.values()) if isinstance(container, dict) else list(container)


def holds_checkpoint(directory: Path) -> bool:
    return (Path(directory) / LAYOUT_FILE).is_file()


def read_full_weights(directory: Path, model: nn.Module, trainable_only: bool) -> dict[str, Any]:
    """fp32 weights rebuilt from the ZeRO partitions of every rank (any stage, any world size), lazily:
    each tensor is read when copied into the model, so the peak is one model, not two."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = Path(directory) / CHECKPOINT_TAG
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            return get_fp32_state_dict_from_zero_checkpoint(
                str(ds_dir.parent), tag=ds_dir.name, exclude_frozen_parameters=trainable_only, lazy_mode=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{ds_dir}: cannot read this DeepSpeed checkpoint: {error}") from None
