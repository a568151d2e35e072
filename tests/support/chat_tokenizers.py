"""Tokenizers built locally with each chat family's special tokens, for the built-in templates' tests."""

from __future__ import annotations

from pathlib import Path

# family -> (bos, eos, the other special tokens its template writes)
FAMILY_TOKENS = {
    "chatml": (None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "qwen": (None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
CORPUS = [
    "You are a helpful assistant. Give the opposite: hot cold. Name the color of the sky: The sky is blue.",
    "system user assistant tool ipython model Environment functions name arguments parameters weather Paris",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} {"temperature": 21} It is 21 degrees in Paris.',
]


def build_chat_tokenizer(out_dir: str | Path, family: str):
    """A byte-level BPE tokenizer (no template of its own: a base model's) with `family`'s special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, others = FAMILY_TOKENS[family]
    specials = ["<pad>", "<unk>", *[t for t in (bos, eos) if t], *others]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=others)
    fast.save_pretrained(str(out_dir))
    return fast
