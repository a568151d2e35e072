"""What a model family's attention needs of the job, checked against its config before launch.

Some architectures ask for what one of sharpen's attention paths does not do: a sliding window where the
collator's block mask has none, soft-capped attention logits where sdpa has no soft-capping, a layer that
does not hand the per-sample kernel its segments. Each such job is refused here, in the user's process,
with the reason and the setting that runs it, instead of a traceback in every rank or a silently wrong loss.

Which attention path a job's rows take (the collator's, training/data/packing.py, and the kernel's,
training/kernels/attention.py): rows of one sample each get transformers' own masks, windows included;
rows of several samples (packing, micro-batches laid end to end, a preference pair) get, with
flash_attention_2, position_ids (flash-attn keeps each sample's window); with sdpa on the CPU and
padding-free rows, the per-sample kernel (each sample's window too); otherwise one [T, T] block mask, which
transformers passes through as it is: no sliding window in it.
"""

from __future__ import annotations

from launcher.errors import UserError
from launcher.method_spec import PAIR_METHODS
from launcher.spec import JobSpec


def check_family(spec: JobSpec, config, device: str, micro_batch_size: int) -> None:
    """Raise a UserError where the model of `config` (its transformers config) needs what the job's attention
    path on `device` does not do, with rows of `micro_batch_size` samples."""
    text = config.get_text_config()
    attention = spec.model.attention
    model_class = _model_class(config, reward=spec.method.kind == "reward")
    name = model_class.__name__ if model_class else type(config).__name__.removesuffix("Config")
    several = spec.data.packing or spec.method.kind in PAIR_METHODS or (spec.data.padding_free and micro_batch_size > 1)
    # sequence parallelism runs every row through the per-sample kernel, on any device
    per_sample = attention == "sdpa" and spec.data.padding_free and (device == "cpu" or spec.strategy.sequence_parallel > 1)

    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap is not None and attention == "sdpa":
        raise UserError(
            f"model.attention: sdpa cannot soft-cap attention logits, and {name} caps them at {softcap:g} "
            "(its config's attn_logit_softcapping)",
            "set model.attention: eager" + (", or flash_attention_2 (flash-attn 2.6 or later)" if device == "cuda" else ""),
        )
    if model_class is not None:
        _check_class(model_class, attention, device, several and per_sample)

    window, windowed = _sliding_window(text)
    longest = spec.data.max_length + (spec.method.max_completion_length if spec.method.kind == "grpo" else 0)
    if windowed and window < longest and several and attention != "flash_attention_2" and not per_sample:
        how = f"{attention} on {'CUDA' if device == 'cuda' else 'the CPU'}"
        layers = f"{windowed} of its {text.num_hidden_layers} layers"
        fixes = [
            "model.attention: flash_attention_2 (it keeps each sample's window)" if device == "cuda" else
            "model.attention: sdpa with data.padding_free: true (each sample runs with its window)",
            f"data.max_length: {window} (no sample longer than the window)",
        ]
        if spec.method.kind not in PAIR_METHODS:
            fixes.append("train.micro_batch_size: 1 with data.packing: false (one sample a row, transformers' own mask)")
        raise UserError(
            f"model.attention: {how} lays several samples in a row under one block mask, which has no sliding "
            f"window, but {name} attends within a window of {window} tokens ({layers}) and samples may be "
            f"{longest} tokens long",
            "set " + "; or ".join(fixes),
        )


def _check_class(model_class: type, attention: str, device: str, per_sample: bool) -> None:
    """What transformers' class of the model runs: sdpa, flash-attn, and keywords through to its attention."""
    name = model_class.__name__
    if attention == "sdpa" and not model_class._supports_sdpa:
        raise UserError(
            f"model.attention: {name} has no sdpa attention in transformers",
            "set model.attention: eager"
            + (", or flash_attention_2" if device == "cuda" and model_class._supports_flash_attn else ""),
        )
    if attention == "flash_attention_2" and not model_class._supports_flash_attn:
        raise UserError(
            f"model.attention: {name} has no flash_attention_2 in transformers", "set model.attention: sdpa or eager"
        )
    if per_sample and not model_class._supports_attention_backend:
        raise UserError(
            "model.attention: sdpa on the CPU runs each sample of a padding-free row on its own, from the sample "
            f"lengths transformers passes to the attention; {name}'s layers do not pass them on, so its samples "
            "would attend to each other",
            "set model.attention: eager (a block mask keeps the samples apart)",
        )


def _sliding_window(text_config) -> tuple[int, int]:
    """(the window, how many layers attend within it; 0 where none does). Layers are windowed where the config
    names them `sliding_attention` (Gemma, Qwen2/3 with use_sliding_window), or every layer where the config
    has no layer types and a window (Mistral, Phi-3, Mixtral)."""
    window = getattr(text_config, "sliding_window", None)
    if window is None:
        return 0, 0
    types = getattr(text_config, "layer_types", None)
    if types is None:
        return window, text_config.num_hidden_layers
    return window, sum(t == "sliding_attention" for t in types)


def _model_class(config, reward: bool) -> type | None:
    """transformers' class the job loads for `config`; None for remote code (not imported here)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        return None
