"""Loading the model a job trains: dtype, attention, 4-bit quantisation, PEFT adapters, regional compilation.

Activation checkpointing and the fp32 upcast of trainable params are the strategy's (Strategy.prepare_model).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from launcher.method_spec import ROUTER_LOSS_METHODS
from launcher.spec import JobSpec
from strategies.base import decoder_layer_classes
from training.kernels.attention import kernel_name
from training.moe import lora_targets, router_aux_coefficient

log = logging.getLogger("sharpen")

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(spec: JobSpec):
    """The job's tokenizer, with model.chat_template in place of its own template when the job sets one
    (so final/'s tokenizer, saved from this one, chats as the model was trained)."""
    from transformers import AutoTokenizer

    from training.data.templates import apply_chat_template_setting

    tok = AutoTokenizer.from_pretrained(
        spec.model.tokenizer or spec.model.path,
        trust_remote_code=spec.model.trust_remote_code,
        revision=spec.model.revision,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return apply_chat_template_setting(tok, spec.model.chat_template)


def quantization_config(spec: JobSpec, compute_dtype: torch.dtype):
    """bitsandbytes 4-bit config. Storage dtype = compute dtype by default so FSDP can shard the weights
    (FSDP2 needs one floating dtype per parameter group; uint8 storage cannot be flattened with bf16)."""
    from transformers import BitsAndBytesConfig

    storage = spec.finetune.quant_storage
    storage_dtype = compute_dtype if storage == "auto" else {"uint8": torch.uint8, **TORCH_DTYPES}[storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.finetune.quant_type,
        bnb_4bit_use_double_quant=spec.finetune.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
    )


def load_model(spec: JobSpec, compute_dtype: str, device: torch.device) -> nn.Module:
    """The model as it will be trained, on `device` (CPU for strategies that place it themselves).

    Reward modelling loads the base as AutoModelForSequenceClassification with one label: the base
    model's weights and a new `score` head (seeded by train.seed, so every rank starts alike). A config
    without a pad token gets the tokenizer's (training/methods/reward.py reads rewards where transformers'
    pooling would, and the exported model then scores batches as it was trained)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ft = spec.finetune
    reward = spec.method.kind == "reward"
    compute = TORCH_DTYPES[compute_dtype]
    kwargs: dict = {
        "attn_implementation": kernel_name(spec.model.attention),
        "trust_remote_code": spec.model.trust_remote_code,
        "revision": spec.model.revision,
    }
    if ft.type == "full":
        # fp32 master weights; the strategy runs the forward in bf16 (autocast, FSDP2 policy or DeepSpeed).
        kwargs["dtype"] = torch.float32
    elif ft.type == "lora":
        # Frozen base in the compute dtype (half the memory on GPU); the strategy keeps the adapters fp32.
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = compute
        kwargs["quantization_config"] = quantization_config(spec, compute)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device}
    if reward:
        kwargs["num_labels"] = 1
        torch.manual_seed(spec.train.seed)
    model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
        spec.model.path, **kwargs
    )
    model.config.use_cache = False
    if spec.model.router_aux_loss_coef is not None:  # checked against the config before launch (an MoE model)
        model.config.router_aux_loss_coef = spec.model.router_aux_loss_coef
    coefficient = router_aux_coefficient(model)
    if coefficient is not None and spec.method.kind in ROUTER_LOSS_METHODS:
        source = "model.router_aux_loss_coef" if spec.model.router_aux_loss_coef is not None else "the model config"
        log.info("router load-balancing loss: coefficient %g (%s)", coefficient, source)
    elif coefficient is not None:
        log.info("router load-balancing loss: not added, method %s trains without it (sft and pretrain add it)", spec.method.kind)
    if reward and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec).pad_token_id

    if ft.type == "qlora":
        from peft import prepare_model_for_kbit_training

        # The strategy enables checkpointing, as for the other types (PEFT's would only make the same call).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if ft.type in ("lora", "qlora"):
        model = apply_lora(model, spec)
    # from_pretrained returns the model in eval mode: without this, dropout (LoRA's too) never ran, and
    # transformers checkpoints a layer only while training, so gradient_checkpointing saved nothing.
    model.train()
    if spec.model.compile:
        compile_layers(model)
    return model


def compile_layers(model: nn.Module) -> int:
    """Regional compilation: `Module.compile` on every decoder layer, in place, so parameter names, state
    dicts and checkpoints stay those of the eager model, and the strategies wrap it as usual (FSDP2's
    hooks run outside the compiled region: dynamo skips them). The layers share one code object, so
    dynamo compiles one graph and reuses it; a new micro-batch length recompiles once, then shapes are
    treated as dynamic. Returns the number of layers compiled."""
    classes = decoder_layer_classes(model)
    layers = [m for m in model.modules() if isinstance(m, classes)]
    for layer in layers:
        layer.compile()
    log.info("model.compile: %d decoder layers compiled on first use", len(layers))
    return len(layers)


def apply_lora(model: nn.Module, spec: JobSpec) -> nn.Module:
    """The PEFT model of finetune's LoRA settings over `model`, its adapters seeded by train.seed."""
    from peft import get_peft_model

    config = lora_config(spec, model)
    torch.manual_seed(spec.train.seed)  # identical adapter init on every rank (FSDP2 does not broadcast)
    peft_model = get_peft_model(model, config)
    # PEFT's all-linear reaches an MoE model's routers and experts too, as parameters (not modules)
    parameters = peft_model.peft_config[peft_model.active_adapter].target_parameters
    if parameters:
        log.info("LoRA on parameters (PEFT target_parameters): %s", ", ".join(sorted(parameters)))
    return peft_model


def lora_config(spec: JobSpec, model: nn.Module):
    """finetune's LoRA settings as PEFT's LoraConfig for `model`: what apply_lora adapts, and what the planner
    counts (launcher/shapes.py builds the same adapters on the meta device). target_modules names of the
    experts or their 3D weights become PEFT's target_parameters (training/moe.py)."""
    from peft import LoraConfig, TaskType

    ft = spec.finetune
    target_modules, target_parameters = lora_targets(model, ft.target_modules)
    return LoraConfig(
        # SEQ_CLS (reward models) also trains and saves the `score` head in full (PEFT adds it to modules_to_save).
        task_type=TaskType.SEQ_CLS if spec.method.kind == "reward" else TaskType.CAUSAL_LM,
        r=ft.r,
        lora_alpha=ft.alpha,
        lora_dropout=ft.dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        modules_to_save=ft.modules_to_save or None,
        use_dora=ft.use_dora,
        use_rslora=ft.use_rslora,
    )
