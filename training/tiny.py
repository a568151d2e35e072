"""Tiny models of every family sharpen trains, and their tokenizers, built locally (no hub): for the demo,
the tests and bench/.

`build_tiny_model(out_dir, family)` writes a randomly initialised model of one of FAMILIES from transformers'
own config class, shaped as small as it goes (2 layers, 64 wide) but keeping what makes the family itself:
tied embeddings (Gemma, small Qwen), Gemma 3's sliding-window layers, Phi-3's fused projections, the
experts and router of Mixtral, Qwen3-MoE and OLMoE. `tiny_config(family)` is its config alone, for models built
in memory (the kernel tests)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a task, a domain or a style.",
    "Instruction: add the two numbers. Input: 3 and 4. Response: 7",
    "Sharded data parallel training splits parameters, gradients and optimizer state across ranks.",
]


def build_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus`, give it a chat template, save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


# family -> (transformers config class, what the family's tiny copy sets beyond the common shape).
# head_dim is given where the family's default is not hidden / heads; the MoE families get 4 experts of
# which 2 are active, so a short row leaves some expert without tokens.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "tie_word_embeddings": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 16,
        },
    ),
    "phi3": ("Phi3Config", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    ),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def tiny_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    **overrides,
):
    """The transformers config of `family`'s tiny copy (a key of FAMILIES), in fp32; `overrides` are further
    config fields (the special token ids among them)."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; one of {', '.join(FAMILIES)}")
    config_class, family_fields = FAMILIES[family]
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        **family_fields,
        **overrides,
    }
    config = getattr(transformers, config_class)(**fields)
    config.dtype = torch.float32
    return config


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    **shape,
) -> Path:
    """Write a randomly initialised causal LM of `family` (a key of FAMILIES) and its tokenizer to
    `out_dir` (fp32 safetensors); `shape` are tiny_config's sizes and further config fields."""
    import torch
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, corpus, vocab_size)
    tokens = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(family, **{"vocab_size": len(tokenizer), **tokens, **shape})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    built = {"seed": seed, "family": family, "built_by": "training.tiny"}
    (out / "sharpen-tiny.json").write_text(json.dumps(built) + "\n")
    return out


def build_tiny_llama(out_dir: str | Path, corpus: Iterable[str] | None = None, **shape) -> Path:
    """Write a randomly initialised LlamaForCausalLM and its tokenizer to `out_dir` (fp32 safetensors)."""
    return build_tiny_model(out_dir, "llama", corpus, **shape)


def corpus_from_jsonl(path: str | Path) -> list[str]:
    """Every string value of every record in a JSONL file (to train a tokenizer that fits the data)."""
    texts: list[str] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        stack = [record]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return texts
