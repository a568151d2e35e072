"""The planner's estimated peak GPU memory per rank against torch.cuda.max_memory_allocated, on one GPU.

    python bench/memory_check.py [--only NAME ...] [--json-out memory_check.json] [--keep DIR]

Each job is planned by launcher.plan.build_plan (device cuda, this GPU's memory) and then trained as a rank
trains it: training.model.load_model, training.worker.build_strategy, training.methods' loss, the loop's
loss scaling and accumulation, 3 optimizer steps. Every micro-batch is the planner's worst case: each sample
max_length tokens and every token labelled (so the loss projects every position onto the vocabulary).

Measured = torch.cuda.max_memory_allocated() over the training steps, counted from before the model is
loaded (the allocator's tensors only, as the estimate: the CUDA context and NCCL's buffers are in neither).
The setup's own peak (loading, DeepSpeed flattening its parameters) is reported beside it, not compared.
Each job runs in its own process: a fresh allocator, no DeepSpeed or FSDP state carried between jobs.
Strategies that need a process group run with a world of one (NCCL); the target is within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024**3
STEPS = 3
TOLERANCE = 0.10
# A Llama-3-shaped model small enough for one GPU in every strategy (~0.9B parameters, Llama-3's vocabulary,
# so the loss over the vocabulary weighs as it does in the real model), random weights, written once.
MODEL = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
# name: (strategy, finetune, attention, gradient_checkpointing, micro batch, accumulation, max_length)
JOBS = {
    "single-full": ("single", "full", "sdpa", "none", 1, 1, 2048),
    "single-full-packed": ("single", "full", "sdpa", "full", 2, 2, 2048),  # 2 samples in a row: block mask
    "single-lora": ("single", "lora", "sdpa", "none", 2, 1, 2048),
    "single-lora-eager": ("single", "lora", "eager", "full", 2, 1, 1024),
    "single-qlora": ("single", "qlora", "sdpa", "full", 1, 2, 4096),
    "zero2-full": ("zero2", "full", "sdpa", "full", 1, 2, 4096),
    "zero3-lora": ("zero3", "lora", "sdpa", "none", 1, 1, 2048),
    "fsdp-full": ("fsdp", "full", "sdpa", "full", 1, 1, 4096),
    "fsdp-full-accumulating": ("fsdp", "full", "sdpa", "full", 1, 2, 2048),
    "single-lora-flash": ("single", "lora", "flash_attention_2", "none", 4, 1, 2048),  # needs flash-attn
    "fsdp-full-selective": ("fsdp", "full", "sdpa", "selective", 1, 1, 4096),
    "single-lora-selective": ("single", "lora", "sdpa", "selective", 2, 1, 2048),
}


def job_spec(name: str, model_dir: Path):
    from launcher.spec import JobSpec

    strategy, finetune, attention, checkpointing, micro, accum, max_length = JOBS[name]
    return JobSpec.model_validate(
        {
            "name": f"memory-check-{name}",
            "model": {"path": str(model_dir), "dtype": "bf16", "attention": attention,
                      "gradient_checkpointing": checkpointing},
            "finetune": {"type": finetune, "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "data": {"train": [{"path": str(REPO / "examples" / "data" / "alpaca_tiny.jsonl")}],
                     "max_length": max_length},
            "train": {"micro_batch_size": micro, "global_batch_size": micro * accum, "max_steps": STEPS},
            "strategy": {"name": strategy},
            "resources": {"nodes": 1, "gpus_per_node": 1},
            "device": "cuda",
        }
    )  # fmt: skip


def worst_case_batch(spec, vocab: int, seed: int):
    """One micro-batch of micro_batch_size samples of exactly max_length tokens, every token labelled."""
    import torch

    from training.data.packing import collate

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(spec.train.micro_batch_size):
        ids = torch.randint(0, vocab, (spec.data.max_length + 1,), generator=gen).tolist()
        rows.append({"input_ids": ids[:-1], "labels": ids[1:], "segment_lengths": [spec.data.max_length]})
    return collate(rows, padding_free=spec.data.padding_free, attention=spec.model.attention)


def run_job(name: str, model_dir: Path) -> dict:
    """Plan, then train STEPS steps on cuda:0; returns estimate and measurement (in this process)."""
    import torch
    import torch.distributed as dist

    from launcher.planner import build_plan
    from strategies.base import DistEnv
    from training.methods import create_method
    from training.model import load_model
    from training.worker import build_strategy

    spec = job_spec(name, model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        plan, notices = build_plan(spec, Path(tmp) / "run", device="cuda")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        if plan.strategy != "single":
            dist.init_process_group(
                "nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1, device_id=device
            )
        env = DistEnv(device=device, backend="nccl")
        torch.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        strategy = build_strategy(plan, env, load_model(spec, plan.compute_dtype, device))
        after_setup = torch.cuda.memory_allocated() - before
        setup_peak = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        method = create_method(spec.method.kind)
        vocab = strategy.unwrap().config.vocab_size
        after_steps = []
        for step in range(STEPS):
            micro_batches = [worst_case_batch(spec, vocab, step * 100 + m) for m in range(plan.grad_accum)]
            denominator = sum(mb.num_label_tokens for mb in micro_batches)
            for m, micro in enumerate(micro_batches):
                micro = micro.to(device)
                with strategy.accumulate(m == len(micro_batches) - 1):
                    with strategy.forward_context():
                        out = method(strategy.model, micro)
                    strategy.backward(out.loss_sum * (plan.world_size / denominator))
            strategy.step()
            torch.cuda.synchronize()
            after_steps.append(torch.cuda.memory_allocated() - before)
        measured = torch.cuda.max_memory_allocated() - before
        strategy.teardown()
        if dist.is_initialized():
            dist.destroy_process_group()
    estimate = plan.chosen["bytes_per_rank"]
    return {
        "job": name,
        "strategy": plan.strategy,
        "micro_batch_size": plan.micro_batch_size,
        "grad_accum": plan.grad_accum,
        "estimate": estimate,
        "measured_peak": measured,
        "ratio": estimate["total"] / measured,
        "setup_peak": setup_peak,
        "after_setup": after_setup,  # compare with the estimate's params (+ grads a strategy preallocates)
        "after_steps": after_steps,  # steady state between steps: params + optimizer (+ kept grads)
        "notices": notices,
    }


def write_model(model_dir: Path) -> None:
    """A Llama-shaped model with random weights, saved like a hub checkpoint (bf16 safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, tie_word_embeddings=False, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(model_dir), safe_serialization=True)


def available(name: str) -> str | None:
    """Why a job cannot run here, or None."""
    if JOBS[name][2] == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed"
    if JOBS[name][1] == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "bitsandbytes is not installed"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(JOBS), help="jobs to run (default: all)")
    parser.add_argument("--json-out", type=Path, help="write every job's numbers here")
    parser.add_argument("--keep", type=Path, help="where to write (or find) the random-weight model")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        args.result.write_text(json.dumps(run_job(args.job, args.model)) + "\n")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("memory_check needs a CUDA GPU; nothing was run", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.keep or Path(tmp) / "model"
        if not (model_dir / "config.json").is_file():
            write_model(model_dir)
        results = []
        for name in args.only or list(JOBS):
            if why := available(name):
                print(f"{name}: skipped ({why})")
                continue
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--job", name, "--model", str(model_dir), "--result", str(out)]
            proc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0 or not out.is_file():
                print(f"{name}: failed (exit {proc.returncode})")
                results.append({"job": name, "failed": proc.returncode})
                continue
            results.append(json.loads(out.read_text()))
            print_row(results[-1])
    if args.json_out:
        device = torch.cuda.get_device_name(0)
        args.json_out.write_text(
            json.dumps({"device": device, "model": MODEL, "results": results}, indent=2) + "\n"
        )
    measured = [r for r in results if "ratio" in r]
    within = sum(abs(r["ratio"] - 1) <= TOLERANCE for r in measured)
    print(f"{within} of {len(measured)} jobs within {TOLERANCE:.0%} of the measured peak")
    return 0 if within == len(measured) and len(measured) == len(results) else 1


def print_row(r: dict) -> None:
    e = r["estimate"]
    parts = ", ".join(
        f"{k} {e[k] / GIB:.2f}" for k in ("params", "grads", "optimizer", "buffers", "activations")
    )
    print(
        f"{r['job']:<24} {r['strategy']:<6} micro {r['micro_batch_size']} x {r['grad_accum']}: "
        f"estimated {e['total'] / GIB:6.2f} GiB, measured {r['measured_peak'] / GIB:6.2f} GiB "
        f"(x{r['ratio']:.3f}); setup peak {r['setup_peak'] / GIB:.2f}; estimate = {parts}"
    )


if __name__ == "__main__":
    sys.exit(main())
