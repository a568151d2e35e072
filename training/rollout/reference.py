"""GRPO's reference model (beta > 0), never a second copy where one can be avoided:

- LoRA / QLoRA: the policy itself with its adapter switched off (peft's disable_adapter), a no-grad
  forward of the same micro-batch. No memory.
- full fine-tuning: the initial weights loaded once more, frozen, and placed by the job's strategy as it
  places the policy (sharded under fsdp and zero3; `Strategy.frozen_copy`). A resumed run loads them
  from the model source again: the reference is the model before training, whatever step it resumes.

Either gives a function (model, micro-batch) -> [completion tokens] log-probabilities, run through
`run_forward` like every forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.methods.grpo import GRPOLoss


def build_reference(strategy, spec, compute_dtype: str, loss: GRPOLoss) -> Callable[[nn.Module, object], torch.Tensor]:
    if spec.finetune.type in ("lora", "qlora"):
        from peft import PeftModel

        peft_model = next(m for m in strategy.model.modules() if isinstance(m, PeftModel))

        def adapter_disabled(model: nn.Module, micro) -> torch.Tensor:
            with peft_model.disable_adapter():
                return loss.token_logps(model, micro)

        return adapter_disabled
    from training.model import TORCH_DTYPES, load_model

    initial = load_model(spec, compute_dtype, strategy.env.device).to(TORCH_DTYPES[compute_dtype])
    frozen = strategy.frozen_copy(initial)

    def frozen_model(model: nn.Module, micro) -> torch.Tensor:
        return loss.token_logps(frozen, micro)

    return frozen_model
