"""Build a tiny Llama and a tokenizer trained on examples/data/*.jsonl, for the demo and the benchmarks.

    python examples/make_tiny_model.py OUT_DIR [--size tiny|bench]

tiny:  hidden 64, 2 layers, vocab 512   (~0.1M parameters; the demo and the tests)
bench: hidden 256, 4 layers, vocab 2048 (~4M parameters; big enough for throughput numbers to mean something)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.data.formats import ALPACA_PROMPT_WITH_INPUT  # noqa: E402
from training.tiny import build_tiny_llama, corpus_from_jsonl  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    "bench": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = sorted((REPO / "examples" / "data").glob("*.jsonl"))
    if not files:
        sys.exit("no examples/data/*.jsonl: run python examples/make_dataset.py first")
    # The prompt template's own words, so "### Instruction:" becomes a few tokens rather than many.
    corpus = [ALPACA_PROMPT_WITH_INPUT] * 50 + [text for f in files for text in corpus_from_jsonl(f)]
    size = SIZES[args.size]
    out = build_tiny_llama(args.out_dir, corpus=corpus, seed=args.seed, **size)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    tokens = config.vocab_size
    if tokens < size["vocab_size"]:
        # The demo corpus has fewer distinct merges than the vocab asked for; pad the embedding and the
        # output layer to the requested size (as large models pad theirs) so the shapes, and so the
        # compute and memory of a benchmark, are those of the named size.
        config.vocab_size = size["vocab_size"]
        torch.manual_seed(args.seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(out), safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote a {args.size} Llama ({params / 1e6:.2f}M parameters, embedding {config.vocab_size} rows, "
        f"tokenizer {tokens} tokens) to {out}"
    )


if __name__ == "__main__":
    main()
