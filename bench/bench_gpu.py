"""GPU benchmark (issue 7): a ~1.1B Llama, full fine-tune through `sharpen run` (bf16, FSDP2, sequence 2048),
then LoRA through sharpen and through HF Trainer + PEFT at the same batch, interleaved.

    python bench/bench_gpu.py [--part all|full|lora] [--repeats 3] [--json-out bench-gpu.json]

Needs one CUDA GPU (H200 in issue 7), torch with CUDA, transformers, peft, datasets, psutil and sharpen
importable from the repo root (`pip install -e .`). Nothing is downloaded: the model is built here from a
config with random weights, the tokenizer is trained on examples/data, the text is synthetic.

The model: LlamaForCausalLM, hidden 2048, 22 layers, 16 heads (head dim 128), 8 KV heads, intermediate
5632, vocab 32000, untied output layer: 1.17B parameters (1.10B in matmuls), random init, saved in bf16
to WORK/model-1b.
The data: synthetic documents of random tokens of this tokenizer, decoded to text and written as
`format: text` JSONL; sharpen tokenizes and packs them (`data.packing`) into rows of 2048 tokens. By
default every document is longer than a row, so each row is one causal sequence (no block mask) and
`data.padding_free: false` keeps the micro-batch as [batch, 2048] rows; `--doc-tokens LO HI` makes
shorter documents that share rows (then use --attention flash_attention_2: sdpa needs a dense mask).

(a) full: `method.kind pretrain`, `finetune.type full`, `model.dtype bf16` (fp32 master weights, bf16
    compute), `strategy.name fsdp` (FSDP2) on 1 GPU, no gradient checkpointing, micro = global batch
    --full-batch rows, logging.every 1. Reported: tokens/s over the steps after --skip (metrics.jsonl
    tokens and elapsed_s), sharpen's own MFU (median of metrics.jsonl `mfu` over those steps: its FLOPs
    per token over the 4096^2 bf16 matmul rate its worker measures for 0.3 s) and this script's MFU:
    (6 N + attention) FLOPs per token x tokens/s over the bf16 matmul rate measured here (8192^2, the
    best of 5 timed 1 s loops). N counts the matmul weights (every linear layer and the output layer;
    not the input embedding); attention adds 6 L d (s + 1) per token of a causal segment of s tokens
    (QK^T and AV, forward 2 and backward 4 FLOPs a multiply-add, over s(s+1)/2 pairs). Target: >= 50%.
(b) lora: r 16, alpha 32, dropout 0, all-linear; base in bf16, adapters fp32; micro = global batch
    --lora-batch rows. sharpen (`strategy.name single`) and bench/hf_trainer.py (Trainer, bf16=True,
    the same rows in sharpen's order, the same AdamW and LR lambda) alternate A B A B --repeats times.
    Reported: tokens/s (median, min-max), the ratio, and peak memory: torch.cuda.max_memory_allocated,
    for sharpen read from RUN/report.md `peak_memory_gib` (the whole worker process: training, the
    end-of-run checkpoint and final/ export), for HF taken right after trainer.train(). Targets:
    >= 1.3x tokens/s and no more peak memory.

Both arms sync once a step (sharpen's logging.every 1 reads the loss; hf_trainer.py's step clock calls
torch.cuda.synchronize on GPU), so per-step times are the GPU's. Every run dir is deleted after it is read
(a full run's checkpoint is ~14 GB); the model, data and tokenized cache stay in --work-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.harness import RunResult  # noqa: E402

SEQ = 2048
# TinyLlama's width, MLP and vocab with 128-wide heads; 22 layers make it ~1.17B (16 layers would be 0.89B).
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16, num_kv_heads=8)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TRAIN = {"warmup_steps": 2, "lr_scheduler": "cosine", "min_lr_ratio": 0.0, "seed": 0, "save_every": 0}


# ------------------------------------------------------------------------------------ model and data


def require_cuda() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("bench_gpu.py: torch is not installed")
    if not torch.cuda.is_available():
        sys.exit(
            f"bench_gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(torch.version.cuda = {torch.version.cuda}). Run it on a machine with a GPU; the CPU "
            f"benchmarks are bench/bench_cpu.py and bench/startup.py."
        )


def build_model(work: Path, seed: int = 0) -> Path:
    """The ~1.1B Llama: tokenizer trained on examples/data, config from MODEL_1B, random init on the GPU,
    saved in bf16. Built once per work dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.data.formats import ALPACA_PROMPT_WITH_INPUT
    from training.tiny import build_tokenizer, corpus_from_jsonl

    out = work / "model-1b"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    files = sorted((REPO / "examples" / "data").glob("*.jsonl"))
    corpus = [ALPACA_PROMPT_WITH_INPUT] * 50 + [text for f in files for text in corpus_from_jsonl(f)]
    tokenizer = build_tokenizer(out, corpus, vocab_size=4096)  # the corpus gives fewer; the model has 32000 rows
    m = MODEL_1B
    config = LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return out


def write_text_data(work: Path, model: Path, docs: int, lo: int, hi: int, seed: int = 0) -> Path:
    """`docs` JSONL documents of lo..hi random (non-special) tokens of the model's tokenizer, as text."""
    from transformers import AutoTokenizer

    out = work / f"synthetic-{docs}x{lo}-{hi}.jsonl"
    if out.exists():
        return out
    tok = AutoTokenizer.from_pretrained(model)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(docs):
            ids = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    tmp.rename(out)
    return out


def job(name: str, model: Path, data: Path, cache: Path, *, full: bool, batch: int, steps: int, attention: str,
        compile: bool = False, checkpointing: str = "none") -> dict:
    return {
        "name": name,
        "model": {"path": str(model), "dtype": "bf16", "attention": attention,
                  "gradient_checkpointing": checkpointing, "compile": compile},
        "finetune": {"type": "full"} if full else {"type": "lora", **LORA},
        "method": {"kind": "pretrain"},
        "data": {
            "train": [{"path": str(data), "format": "text"}], "max_length": SEQ, "packing": True,
            "padding_free": False, "cache_dir": str(cache),
        },
        "train": {
            "micro_batch_size": batch, "global_batch_size": batch, "max_steps": steps,
            "lr": 1e-5 if full else 1e-4, **TRAIN,
        },
        "strategy": {"name": "fsdp" if full else "single"},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": "cuda",
    }


class Prepared:
    """A job file and its tokenized data (so `sharpen run` hits the cache), and the rows sharpen trains on."""

    def __init__(self, work: Path, spec_dict: dict):
        import numpy as np
        import yaml

        from launcher.jobfile import load_job
        from training.data.cache import load_prepared
        from training.data.prepare import prepare_dataset
        from training.data.sampler import deal, epoch_order

        self.path = work / f"{spec_dict['name']}.yaml"
        self.path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        spec = self.spec = load_job(self.path)
        cache = prepare_dataset(  # the same call as launcher/prepare.py's, so `sharpen run` finds this cache
            spec.data, spec.method.kind, spec.model.tokenizer or spec.model.path,
            trust_remote_code=spec.model.trust_remote_code, train_on=getattr(spec.method, "train_on", "all"),
        )
        self.dataset = load_prepared(cache)
        batch, steps = spec.train.global_batch_size, spec.train.max_steps
        lengths = np.asarray(self.dataset.with_format("arrow")["length"]).astype(np.int64)
        per_epoch = len(lengths) // batch
        if per_epoch < 1:
            raise SystemExit(f"{len(lengths)} packed rows, fewer than one batch of {batch}")
        self.order = []
        for step in range(steps):
            epoch, position = divmod(step, per_epoch)
            members = epoch_order(len(lengths), spec.train.seed, epoch, spec.data.shuffle)[
                position * batch : (position + 1) * batch
            ]
            self.order.append([int(i) for i in deal(members, lengths, 1, 1, batch)[0][0]])
        self.tokens = [int(sum(lengths[i] for i in rows)) for rows in self.order]
        segments = [s for rows in self.order for i in rows for s in self.dataset[i]["segment_lengths"]]
        # 6 L d (s + 1) per token of a causal segment of s tokens, averaged over the trained tokens
        self.mean_s_plus_1 = sum(s * (s + 1) for s in segments) / sum(segments)
        self.rows_full = all(int(lengths[i]) == SEQ for rows in self.order for i in rows)
        self.one_segment = all(len(self.dataset[i]["segment_lengths"]) == 1 for rows in self.order for i in rows)


# ------------------------------------------------------------------------------------------- FLOPs


def measure_bf16_matmul(n: int = 8192, seconds: float = 1.0, trials: int = 5) -> float:
    """Dense bf16 matmul FLOP/s of this GPU: the best of `trials` loops of ~`seconds`, CUDA-event timed."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.matmul(a, b, out=c)
    end.record()
    torch.cuda.synchronize()
    per = start.elapsed_time(end) / 1000 / 10
    iters = max(10, int(seconds / per))
    best = 0.0
    for _ in range(trials):
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1000))
    del a, b, c
    torch.cuda.empty_cache()
    return best


def matmul_weights(model_dir: Path) -> dict[str, int]:
    """Weights in matmuls, from the config: per layer q, k, v, o and the MLP; the output layer once."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    lora_per_layer = 0
    r = LORA["r"]
    for fan_in, fan_out in ((h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)):
        lora_per_layer += r * (fan_in + fan_out)
    return {
        "base": layers * per_layer + h * c.vocab_size, "lora": layers * lora_per_layer, "layers": layers,
        "attn_width": q, "total_params": layers * per_layer + 2 * h * c.vocab_size + (2 * layers + 1) * h,
    }


def flops_per_token(w: dict[str, int], mean_s_plus_1: float, full: bool) -> float:
    """Full: 6 N. LoRA: the frozen base 4 N (forward, input gradient; no weight gradient), adapters 6 N.
    Both plus causal attention 6 L d (s + 1). (LoRA on the output layer: peft's all-linear skips it.)"""
    attention = 6 * w["layers"] * w["attn_width"] * mean_s_plus_1
    if full:
        return 6 * w["base"] + attention
    return 4 * w["base"] + 6 * w["lora"] + attention


# --------------------------------------------------------------------------------------------- arms


def env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def sharpen_executable() -> list[str]:
    script = Path(sys.executable).parent / "sharpen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher.cli"]


def report_figure(run_dir: Path, key: str) -> float | None:
    """A figure from RUN/report.md's table (written with 4 significant digits)."""
    path = run_dir / "report.md"
    if not path.exists():
        return None
    m = re.search(rf"^\| {re.escape(key)} \| ([^|]+) \|$", path.read_text(), re.MULTILINE)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def run_sharpen(work: Path, prepared: Prepared, arm: str, repeat: int, keep: bool) -> RunResult:
    run_dir = work / "runs" / f"{arm}-{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [*sharpen_executable(), "run", str(prepared.path), "--output-dir", str(run_dir)]
    timing = harness.run_timed(cmd, env=env(), step_log=run_dir / "metrics.jsonl", log_file=run_dir / "bench.log", cwd=REPO)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "elapsed_s" in r]
    steps = prepared.spec.train.max_steps
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"{run_dir}/metrics.jsonl does not hold one row per step")
    cumulative = [r["tokens"] for r in rows]
    tokens = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    if tokens != prepared.tokens:
        raise AssertionError(f"sharpen's tokens per step {tokens[:3]}... differ from the bench's {prepared.tokens[:3]}...")
    result = RunResult(
        arm=arm, repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
        losses=[r["loss"] for r in rows], step_times=[r["elapsed_s"] for r in rows],
        samples_per_step=[len(s) for s in prepared.order], tokens_per_step=tokens,
        extra={
            "mfu_rows": [r.get("mfu") for r in rows],
            "peak_memory_gib": report_figure(run_dir, "peak_memory_gib"),
            "peak_tflops_per_rank": report_figure(run_dir, "peak_tflops_per_rank"),
        },
    )
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def write_hf_rows(work: Path, prepared: Prepared) -> Path:
    """The rows sharpen trains on, in its order, as HF wants them (labels unshifted: the model shifts)."""
    import datasets

    out = work / "hf-dataset-lora"
    rows = [prepared.dataset[i] for step in prepared.order for i in step]
    hf = {
        "input_ids": [r["input_ids"] for r in rows],
        "attention_mask": [[1] * len(r["input_ids"]) for r in rows],
        "labels": [[-100, *r["labels"][:-1]] for r in rows],
    }
    shutil.rmtree(out, ignore_errors=True)
    datasets.Dataset.from_dict(hf).save_to_disk(str(out))
    return out


def run_hf(work: Path, prepared: Prepared, hf_data: Path, repeat: int, attention: str, keep: bool) -> RunResult:
    out = work / "runs" / f"hf-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = prepared.spec.train
    config = {
        "model": str(prepared.spec.model.path), "dataset": str(hf_data), "output_dir": str(out), "device": "cuda",
        "threads": None, "seed": t.seed, "max_steps": t.max_steps, "micro_batch_size": t.micro_batch_size,
        "log_every": 1, "lora": LORA, "dtype": "bf16", "attention": attention,
        "optimizer": {
            "lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm, "lr_scheduler": t.lr_scheduler, "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio,
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    timing = harness.run_timed(
        [sys.executable, str(BENCH / "hf_trainer.py"), str(out / "config.json")],
        env=env(), step_log=out / "steps.jsonl", log_file=out / "bench.log", cwd=REPO,
    )
    result = json.loads((out / "result.json").read_text())
    if len(result["losses"]) != t.max_steps:
        raise RuntimeError(f"HF Trainer ran {len(result['losses'])} steps, not {t.max_steps}")
    run = RunResult(
        arm="hf", repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s, losses=result["losses"],
        step_times=result["step_times"], samples_per_step=[len(s) for s in prepared.order],
        tokens_per_step=prepared.tokens, extra={"peak_memory_gib": result["peak_memory_gib"]},
    )
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return run


# ------------------------------------------------------------------------------------------- report


def cell(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def full_report(runs: list[RunResult], skip: int, per_token: float, peak: float) -> tuple[str, dict]:
    tps = [r.steady(skip)["tokens_per_s"] for r in runs]
    mfu_sharpen = [statistics.median(m for m in r.extra["mfu_rows"][skip:] if m is not None) for r in runs]
    mfu_ours = [t * per_token / peak for t in tps]
    lines = [
        f"(a) full fine-tune, FSDP2, bf16, 1 GPU, {len(runs)} run(s), steps {skip + 1}-{len(runs[0].step_times)}:",
        f"  tokens/s                         {cell(tps, '.0f')}",
        f"  MFU, sharpen's (metrics.jsonl)   {cell([100 * m for m in mfu_sharpen], '.1f')} %  "
        f"(over its worker's measured {cell([r.extra['peak_tflops_per_rank'] for r in runs], '.0f')} TFLOP/s)",
        f"  MFU, this script's               {cell([100 * m for m in mfu_ours], '.1f')} %  "
        f"({per_token / 1e9:.2f} GFLOP/token over the measured bf16 matmul rate {peak / 1e12:.0f} TFLOP/s); "
        f"target >= 50 %",
        f"  peak memory                      {cell([r.extra['peak_memory_gib'] for r in runs], '.1f')} GiB",
        f"  step-1 / last loss               {runs[0].losses[0]:.4f} / {runs[0].losses[-1]:.4f}",
    ]
    summary = {
        "tokens_per_s": harness.spread(tps), "mfu_sharpen": harness.spread(mfu_sharpen),
        "mfu_independent": harness.spread(mfu_ours), "flops_per_token": per_token, "bf16_matmul_flops": peak,
        "peak_memory_gib": [r.extra["peak_memory_gib"] for r in runs],
    }
    return "\n".join(lines), summary


def lora_report(runs: list[RunResult], skip: int, per_token: float, peak: float) -> tuple[str, dict]:
    ours = [r for r in runs if r.arm == "sharpen-lora"]
    theirs = [r for r in runs if r.arm == "hf"]
    s_tps = [r.steady(skip)["tokens_per_s"] for r in ours]
    h_tps = [r.steady(skip)["tokens_per_s"] for r in theirs]
    s_mem = [r.extra["peak_memory_gib"] for r in ours]
    h_mem = [r.extra["peak_memory_gib"] for r in theirs]
    pairs = [a / b for a, b in zip(s_tps, h_tps, strict=True)]
    ratio = statistics.median(s_tps) / statistics.median(h_tps)
    mem_ratio = (statistics.median([m for m in s_mem if m is not None]) / statistics.median(h_mem)
                 if any(m is not None for m in s_mem) else None)
    lines = [
        f"(b) LoRA r={LORA['r']}, bf16 base, 1 GPU, {len(ours)} interleaved repeats, steps {skip + 1}-"
        f"{len(ours[0].step_times)}:",
        f"  {'':<18}{'tokens/s':>26}{'MFU %':>20}{'peak GiB':>22}{'wall s':>22}",
        f"  {'sharpen':<18}{cell(s_tps, '.0f'):>26}{cell([100 * t * per_token / peak for t in s_tps], '.1f'):>20}"
        f"{cell(s_mem, '.2f'):>22}{cell([r.wall_s for r in ours], '.1f'):>22}",
        f"  {'HF Trainer+PEFT':<18}{cell(h_tps, '.0f'):>26}{cell([100 * t * per_token / peak for t in h_tps], '.1f'):>20}"
        f"{cell(h_mem, '.2f'):>22}{cell([r.wall_s for r in theirs], '.1f'):>22}",
        f"  sharpen / HF tokens/s: {ratio:.2f}x (per pair {min(pairs):.2f}-{max(pairs):.2f}x; target >= 1.3x)",
        f"  sharpen / HF peak memory: {mem_ratio:.2f}x (target <= 1.0x)" if mem_ratio else
        "  sharpen peak memory: not in report.md",
        f"  loss curves, max relative difference (every pair): "
        f"{max(harness.max_relative_difference(a.losses, b.losses) for a in ours for b in theirs):.2e}",
    ]
    summary = {
        "sharpen_tokens_per_s": harness.spread(s_tps), "hf_tokens_per_s": harness.spread(h_tps),
        "ratio_tokens_per_s": ratio, "ratio_per_pair": harness.spread(pairs), "sharpen_peak_memory_gib": s_mem,
        "hf_peak_memory_gib": h_mem, "ratio_peak_memory": mem_ratio, "flops_per_token": per_token,
    }
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "full", "lora"], default="all", help="(a) full, (b) lora, or both")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved sharpen/HF LoRA runs (median reported)")
    parser.add_argument("--full-repeats", type=int, default=1, help="runs of (a) (each ~1 min plus a ~14 GB checkpoint)")
    parser.add_argument("--full-batch", type=int, default=8, help="(a) rows of 2048 tokens a step (micro = global)")
    parser.add_argument("--lora-batch", type=int, default=8, help="(b) rows of 2048 tokens a step, both arms")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps a run")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the rates (warm-up)")
    parser.add_argument("--attention", choices=["sdpa", "flash_attention_2"], default="sdpa")
    parser.add_argument("--doc-tokens", type=int, nargs=2, metavar=("LO", "HI"), default=(2600, 3400),
                        help="synthetic document lengths in tokens before re-tokenizing (default: longer than a row)")
    parser.add_argument("--compile", action="store_true", help="sharpen's model.compile (the HF arm stays eager)")
    parser.add_argument("--checkpointing", choices=["none", "selective", "full"], default="none",
                        help="(a)'s model.gradient_checkpointing: what selective costs beside full (b has HF's arm: none)")
    parser.add_argument("--keep-runs", action="store_true", help="keep run dirs (a full run's checkpoint is ~14 GB)")
    parser.add_argument("--json-out", type=Path, help="write the summary and every run's curves here")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-gpu",
                        help="model, data and run dirs (model and data are built once and reused)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.full_repeats < 1 or not 0 <= args.skip < args.steps - 1:
        parser.error("--repeats and --full-repeats must be >= 1, and --skip below --steps - 1")
    require_cuda()
    import torch

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t = time.perf_counter()
    print(f"building the 1.1B model in {work} (once) ...", flush=True)
    model = build_model(work)
    docs = args.steps * max(args.full_batch, args.lora_batch) + 16
    data = write_text_data(work, model, docs, *args.doc_tokens)
    print(f"  model and {docs} synthetic documents ready in {time.perf_counter() - t:.0f} s", flush=True)
    print("measuring the bf16 matmul rate ...", flush=True)
    peak = measure_bf16_matmul()
    print(f"  {peak / 1e12:.0f} TFLOP/s ({torch.cuda.get_device_name()})", flush=True)
    weights = matmul_weights(model)
    payload: dict = {
        "bench": "gpu", "date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": {**harness.machine(), "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda},
        "bf16_matmul_flops": peak, "model": {**MODEL_1B, "params": weights["total_params"]}, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    texts = [f"model: {weights['total_params'] / 1e9:.2f}B parameters ({weights['base'] / 1e9:.2f}B in matmuls); "
             f"{torch.cuda.get_device_name()}, bf16 matmul {peak / 1e12:.0f} TFLOP/s measured"]
    all_runs: list[RunResult] = []
    cache = work / "tokenized"
    for part in ("full", "lora"):
        if args.part not in ("all", part):
            continue
        full = part == "full"
        batch = args.full_batch if full else args.lora_batch
        prepared = Prepared(work, job(f"bench-gpu-{part}", model, data, cache, full=full, batch=batch,
                                      steps=args.steps, attention=args.attention, compile=args.compile,
                                      checkpointing=args.checkpointing if full else "none"))
        if not (prepared.rows_full and prepared.one_segment) and args.doc_tokens[0] > SEQ:
            raise SystemExit("the packed rows are not all one 2048-token document: raise --doc-tokens")
        per_token = flops_per_token(weights, prepared.mean_s_plus_1, full)
        if full:
            runs = harness.interleave(
                [("sharpen-full", lambda r, p=prepared: run_sharpen(work, p, "sharpen-full", r, args.keep_runs))],
                args.full_repeats, report=lambda s: print(s, flush=True),
            )
            text, summary = full_report(runs, args.skip, per_token, peak)
        else:
            hf_data = write_hf_rows(work, prepared)
            runs = harness.interleave(
                [("sharpen-lora", lambda r, p=prepared: run_sharpen(work, p, "sharpen-lora", r, args.keep_runs)),
                 ("hf", lambda r, p=prepared, d=hf_data: run_hf(work, p, d, r, args.attention, args.keep_runs))],
                args.repeats, report=lambda s: print(s, flush=True),
            )
            text, summary = lora_report(runs, args.skip, per_token, peak)
        print(text, flush=True)  # now, not only at the end: a run stopped by a time limit keeps this part
        texts.append(text)
        payload[part] = summary
        all_runs += runs
    print()
    print("\n\n".join(texts))
    if args.json_out:
        payload["runs"] = harness.results_as_dicts(all_runs)
        harness.write_json(args.json_out, payload)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
