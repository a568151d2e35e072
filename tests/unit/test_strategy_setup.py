"""What the strategies decide without a process group: DeepSpeed's config from the options, FSDP's
decoder layers, and the bytes a set of tensors holds."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from support import strategy_model
from support.strategy_model import build_model

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model_dir = strategy_model.tiny_model_dir


# -- in-process checks (no process group needed) -----------------------------------------------------
def test_deepspeed_config_follows_the_options():
    from strategies.base import DistEnv, StrategyOptions
    from strategies.deepspeed import DeepSpeedStrategy

    options = StrategyOptions(
        compute_dtype=torch.bfloat16,
        micro_batch_size=2,
        gradient_accumulation_steps=8,
        max_grad_norm=None,
        offload_params=True,
    )
    config = DeepSpeedStrategy(options, DistEnv(world_size=4), stage=3).deepspeed_config(hidden_size=64)
    assert config["train_batch_size"] == 2 * 8 * 4
    assert config["gradient_clipping"] == 0.0 and config["bf16"] == {"enabled": True}
    zero = config["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 640  # only norm-sized params stay whole
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        DeepSpeedStrategy(options, DistEnv(), stage=2)
    with pytest.raises(ValueError, match="not supported"):
        DeepSpeedStrategy(replace(options, compute_dtype=torch.float16, offload_params=False), DistEnv(), 1)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fsdp_finds_decoder_layers_without_being_told(tiny_model_dir, finetune):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from strategies.base import DistEnv, StrategyOptions
    from strategies.fsdp import FSDPStrategy

    model = build_model(tiny_model_dir, finetune)
    assert FSDPStrategy(StrategyOptions(), DistEnv())._layer_classes(model) == (LlamaDecoderLayer,)
    with pytest.raises(ValueError, match="no layer classes"):
        FSDPStrategy(StrategyOptions(), DistEnv())._layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero2"])
def test_setup_turns_checkpointing_on_and_keeps_masters_fp32(tiny_model_dir, strategy):
    """A bf16 LoRA model as training/model.py loads it (base, adapters and modules_to_save in bf16 or fp32 as
    PEFT leaves them): after setup every decoder layer checkpoints, and the trainable params are fp32 where
    the strategy's AdamW updates the module's own params; DeepSpeed with bf16 keeps its fp32 masters itself."""
    from support.e2e import ALPACA

    from launcher.spec import JobSpec
    from strategies import create_strategy
    from strategies.base import DistEnv, StrategyOptions, decoder_layer_classes
    from training.model import load_model

    spec = JobSpec.model_validate({
        "model": {"path": tiny_model_dir, "dtype": "bf16", "gradient_checkpointing": "full"},
        "finetune": {"type": "lora", "r": 4, "alpha": 8, "modules_to_save": ["lm_head"]},
        "data": {"train": [{"path": str(ALPACA)}]},
        "device": "cpu",
    })  # fmt: skip
    model = load_model(spec, "bf16", torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, decoder_layer_classes(model))]
    assert layers and not any(layer.gradient_checkpointing for layer in layers)  # the strategy's job, once
    options = StrategyOptions(compute_dtype=torch.bfloat16, gradient_checkpointing=spec.model.gradient_checkpointing)
    instance = create_strategy(strategy, options, DistEnv())
    with contextlib.ExitStack() as stack:
        if strategy == "fsdp":  # FSDP2 needs a process group even for one rank
            import torch.distributed as dist

            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        instance.setup(
            model,
            lambda params: torch.optim.AdamW(params),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        )
        stack.callback(instance.teardown)
        assert all(layer.gradient_checkpointing for layer in layers)
        trainable = {p.dtype for p in instance.unwrap().parameters() if p.requires_grad}
        frozen = {p.dtype for p in instance.unwrap().parameters() if not p.requires_grad}
        assert trainable == ({torch.bfloat16} if strategy == "zero2" else {torch.float32})
        assert frozen == {torch.bfloat16}
        if strategy == "zero2":
            masters = instance.engine.optimizer.single_partition_of_fp32_groups
            assert masters and {m.dtype for m in masters} == {torch.float32}


def test_tensor_bytes_counts_each_byte_once():
    from strategies.base import tensor_bytes

    flat = torch.zeros(100)
    assert tensor_bytes([flat[:10], flat[10:30]]) == 30 * 4  # views of one flat buffer: their slices
    assert tensor_bytes([flat, flat, flat[50:]]) == 100 * 4  # tied / overlapping: once
    assert tensor_bytes([None, torch.zeros(0), torch.zeros(3, dtype=torch.bfloat16)]) == 6
