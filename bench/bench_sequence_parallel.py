"""Activation memory per rank of one long row: whole on one rank beside split over two (sequence parallelism).

Two real ranks on gloo (CPU). A Llama of small layers and one padding-free row of `--tokens` tokens laid out
as samples of `--sample` tokens, LoRA or full fine-tuning (the fused loss either way: no full logits), the causal_lm loss
and its backward as the worker runs them. Arm `whole`: rank 0 runs the whole row (sequence_parallel 1, one
data-parallel rank's share). Arm `split`: each rank runs its half (sequence_parallel 2, the all-to-alls around
attention). Each rank measures the peak of CPU memory the allocator hands out during the step, above what was
allocated before it (torch profiler memory events, tests/support/memory.py), with the gradients already
allocated: what the step's activations, the loss and the exchanges need. Also checks both arms give the same
loss.

    python bench/bench_sequence_parallel.py --tokens 8192 --finetune lora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.kernels.attention import kernel_name

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=False, max_position_embeddings=args.tokens)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = kernel_name("sdpa")
    model.config.use_cache = False
    if args.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    return model.train()


def row(args):
    import torch

    from training.data.packing import collate
    from training.kernels.attention import PER_SAMPLE_SDPA

    gen = torch.Generator().manual_seed(1)
    lengths = [args.sample] * (args.tokens // args.sample)
    ids = torch.randint(10, args.vocab, (sum(lengths),), generator=gen).tolist()
    record = {"input_ids": ids, "labels": ids[1:] + [-100], "segment_lengths": lengths}
    return collate([record], attention=PER_SAMPLE_SDPA)


def rank_main(rank: int, args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from strategies.base import DistEnv
    from tests.support.memory import allocated_during
    from training import kernels
    from training.data.sequence_chunks import chunk_micro_batch
    from training.kernels.sequence_parallel import sequence_group
    from training.methods.causal_lm import CausalLMLoss

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    group = sequence_group(2, rank, 2)
    model = build(args)
    from strategies import create_strategy
    from strategies.base import StrategyOptions

    # the kernels as the worker installs them: the fused loss for a frozen (LoRA) or a trained (full) head
    kernels.apply(model, create_strategy("single", StrategyOptions(), DistEnv()), compiled=False)
    whole = row(args)
    loss_fn = CausalLMLoss()

    def step(micro):
        loss = loss_fn(model, micro).loss_sum
        (loss / whole.num_label_tokens).backward()
        return float(loss)

    result = {}
    for arm in ("whole", "split"):
        micro = whole if arm == "whole" else chunk_micro_batch(whole, group)
        if arm == "whole" and rank != 0:
            dist.barrier()
            continue
        step(micro)  # gradients allocated, as after the first micro-step of a run
        model.zero_grad(set_to_none=False)
        loss, allocated = allocated_during(lambda micro=micro: step(micro))
        model.zero_grad(set_to_none=False)
        if arm == "split":
            total = torch.tensor([loss], dtype=torch.float64)
            dist.all_reduce(total)
            loss = float(total)
        result[arm] = {"peak_bytes": max(allocated), "loss": loss}
        if arm == "whole":
            dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sample", type=int, default=1024, help="tokens per sample in the row")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--finetune", choices=("lora", "full"), default="lora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(args, out_dir), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]
    whole = ranks[0]["whole"]
    split = [r["split"] for r in ranks]
    figures = {
        "tokens": args.tokens, "finetune": args.finetune,
        "whole_peak_mib": whole["peak_bytes"] / 2**20,
        "split_peak_mib_per_rank": [s["peak_bytes"] / 2**20 for s in split],
        "ratio": max(s["peak_bytes"] for s in split) / whole["peak_bytes"],
        "loss_whole": whole["loss"], "loss_split": split[0]["loss"],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.tokens} tokens, {args.finetune}: whole row on one rank {figures['whole_peak_mib']:.0f} MiB; "
              f"split over 2 ranks {', '.join(f'{m:.0f}' for m in figures['split_peak_mib_per_rank'])} MiB per rank "
              f"({figures['ratio']:.2f}x); loss {whole['loss']:.6f} vs {split[0]['loss']:.6f}")
    rel = abs(whole["loss"] - split[0]["loss"]) / abs(whole["loss"])
    return 0 if rel < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
