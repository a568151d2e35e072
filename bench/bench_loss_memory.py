"""The loss through the output projection: plain (full logits) beside fused (training/kernels/fused_loss.py).

A Llama with a large vocabulary (default: Llama 3's 128256) and small layers, so the loss is most of the
step, on the CPU in fp32: LoRA (the projection frozen) or a full fine-tune (`--finetune full`: the
projection trained, its gradient summed in the fused loss's forward); one row of labelled tokens
(pretraining), forward and backward. Prints each arm's median step time and the peak of CPU memory
allocated over one step (torch profiler: the gradients, allocated in the step, count in both arms), and
checks that both give the same loss.

    python bench/bench_loss_memory.py --tokens 2048 --repeats 3
    python bench/bench_loss_memory.py --finetune full --vocab 32000 --tokens 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(vocab: int, hidden: int, layers: int, finetune: str = "lora", tokens: int = 2048):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from training.kernels.fused_loss import fuse_head_loss
    from training.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=max(2048, tokens))
    base = LlamaForCausalLM(config)
    base.config._attn_implementation = "sdpa"
    if finetune == "lora":
        plain = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    else:
        plain = base.train()
    fused = copy.deepcopy(plain)
    assert fuse_head_loss(fused)
    return plain, fused


def step(model, batch, tokens: int) -> float:
    from training.methods.causal_lm import CausalLMLoss

    loss = CausalLMLoss()(model, batch).loss_sum
    (loss / tokens).backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def peak_bytes(model, batch, tokens: int) -> int:
    """Most CPU memory allocated at once during one step, above what was allocated before it."""
    from tests.support.memory import allocated_during

    return max(allocated_during(lambda: step(model, batch, tokens))[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--finetune", choices=("lora", "full"), default="lora")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per arm, alternating (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from training.data.packing import collate

    torch.set_num_threads(args.threads)
    arms = dict(zip(("plain", "fused"), build(args.vocab, args.hidden, args.layers, args.finetune, args.tokens), strict=True))
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    batch = collate([{"input_ids": ids, "labels": ids[1:] + [-100], "segment_lengths": [args.tokens]}])
    losses = {name: step(model, batch, args.tokens) for name, model in arms.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, model in arms.items():
            start = time.perf_counter()
            step(model, batch, args.tokens)
            times[name].append(time.perf_counter() - start)
    summary = {
        name: {"step_s": statistics.median(times[name]), "steps_s": times[name],
               "peak_bytes": peak_bytes(model, batch, args.tokens), "loss": losses[name]}
        for name, model in arms.items()
    }
    print(f"{'LoRA' if args.finetune == 'lora' else 'Full fine-tune of a'} Llama, vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.tokens} labelled "
          f"tokens, fp32, {args.threads} thread(s), median of {args.repeats}:")
    for name, s in summary.items():
        print(f"  {name:5}  step {s['step_s'] * 1e3:7.0f} ms   peak {s['peak_bytes'] / 2**20:7.0f} MiB   loss {s['loss']:.4f}")
    plain, fused = summary["plain"], summary["fused"]
    print(f"  fused / plain: time {fused['step_s'] / plain['step_s']:.2f}x, peak {fused['peak_bytes'] / plain['peak_bytes']:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=1))
    if abs(fused["loss"] - plain["loss"]) > 1e-5 * abs(plain["loss"]):
        print("  the losses differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
