"""CPU benchmark: the issue-2 job through `sharpen run` and through Hugging Face Trainer + PEFT, interleaved.

    python bench/bench_cpu.py [--repeats 3] [--threads N] [--json-out bench.json]

The job: a ~4M-parameter Llama (examples/make_tiny_model.py --size bench), LoRA r=8 alpha=16 on every
linear layer, fp32, 1 rank, micro = global batch 8, 60 steps, examples/data/alpaca_tiny.jsonl (19-56
tokens a sample), loss on completions only. Both arms start from the same weights and adapter init,
see the same samples in the same order (sharpen's world-size invariant order, checked against
training.sampler.step_batches), use AdamW with the same LR schedule and clipping, and the same torch
thread count. sharpen lays each batch end to end (padding-free, sdpa per sample); the Trainer pads
with DataCollatorForSeq2Seq, as HF-based tools do. See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench import arms, harness  # noqa: E402
from bench.harness import RunResult  # noqa: E402

# The fixed job (issue 2, "Benchmark"). Changing it makes old figures incomparable: say so in BENCHMARKS.md.
STEPS = 60
MICRO_BATCH = 8
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
TRAIN = {"lr": 3.0e-3, "warmup_steps": 5, "lr_scheduler": "cosine", "min_lr_ratio": 0.0, "seed": 0}
DATA_FILE = REPO / "examples" / "data" / "alpaca_tiny.jsonl"
SKIP_STEPS = 5  # steady state = steps 6..60: the first steps carry one-off allocations and lazy inits


def job_file(model_dir: Path, cache_dir: Path) -> dict:
    return {
        "name": "bench-cpu",
        "model": {"path": str(model_dir), "dtype": "fp32", "attention": "sdpa"},
        "finetune": {"type": "lora", **LORA},
        "method": {"kind": "sft"},
        "data": {
            "train": [{"path": str(DATA_FILE), "format": "alpaca"}],
            "max_length": 256,
            "cache_dir": str(cache_dir),
        },
        "train": {
            "micro_batch_size": MICRO_BATCH, "global_batch_size": MICRO_BATCH, "max_steps": STEPS,
            "save_every": 0, **TRAIN,
        },
        "strategy": {"name": "single"},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "logging": {"every": 1, "progress": False},
        "device": "cpu",
    }


def build_model(work: Path) -> Path:
    """The bench-size tiny Llama, built once per work dir (make_tiny_model.py is seeded: same weights)."""
    out = work / "model-bench"
    if not (out / "model.safetensors").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [sys.executable, str(REPO / "examples" / "make_tiny_model.py"), str(out), "--size", "bench"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    return out


def check_same_samples(dataset, spec, order: list[list[int]], pad_token_id: int) -> None:
    """The rows given to HF are exactly the tokens and labels of sharpen's step_batches, step by step."""
    from training.data.sampler import step_batches

    batches = step_batches(
        dataset, global_batch_size=MICRO_BATCH, micro_batch_size=MICRO_BATCH, grad_accum=1, rank=0,
        world_size=1, seed=spec.train.seed, shuffle=spec.data.shuffle, padding_free=spec.data.padding_free,
        attention=spec.model.attention, pad_token_id=pad_token_id,
    )
    for step, rows in enumerate(order):
        micro = next(batches).micro_batches[0]
        ids = [t for i in rows for t in dataset[i]["input_ids"]]
        labels = [t for i in rows for t in dataset[i]["labels"]]
        if micro.input_ids.flatten().tolist() != ids or micro.labels.flatten().tolist() != labels:
            raise AssertionError(f"step {step + 1}: the HF rows differ from sharpen's step_batches")


def tokens_per_step(dataset, order: list[list[int]]) -> tuple[list[int], list[int]]:
    """Real tokens of each step, and the tokens HF computes on (each row padded to its batch's longest)."""
    lengths = [[len(dataset[i]["input_ids"]) for i in step] for step in order]
    return [sum(ls) for ls in lengths], [len(ls) * max(ls) for ls in lengths]


class CpuBench:
    def __init__(self, work: Path, threads: int):
        from bench.hf_trainer import lr_lambda as hf_lr_lambda
        from launcher.jobfile import load_job
        from training.data.cache import load_prepared
        from training.data.prepare import prepare_dataset
        from training.loop import lr_lambda

        self.work, self.threads = work, threads
        self.model = build_model(work)
        self.job_path = work / "job.yaml"
        self.job_path.write_text(yaml.safe_dump(job_file(self.model, work / "tokenized"), sort_keys=False))
        spec = load_job(self.job_path)
        self.spec = spec
        # Tokenize here, as `sharpen run` would: its runs then hit the cache, and HF gets the same rows.
        cache = prepare_dataset(spec.data, spec.method.kind, str(self.model), train_on=spec.method.train_on)
        dataset = load_prepared(cache)
        self.order = arms.sharpen_order(
            dataset, batch=MICRO_BATCH, steps=STEPS, seed=spec.train.seed, shuffle=spec.data.shuffle
        )
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(self.model).pad_token_id or 0
        check_same_samples(dataset, spec, self.order, pad_id)
        self.hf_data = arms.write_hf_rows(dataset, self.order, work / "hf-dataset")
        self.tokens, self.padded_tokens = tokens_per_step(dataset, self.order)
        t = spec.train
        ours = lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        theirs = hf_lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        if any(ours(s) != theirs(s) for s in range(t.max_steps + 1)):
            raise AssertionError("bench/hf_trainer.py's LR schedule no longer matches training/loop.py's")

    def run_sharpen(self, repeat: int) -> RunResult:
        timing, rows = arms.run_sharpen(
            self.job_path, self.work / "runs" / f"sharpen-{repeat}", steps=STEPS,
            env=arms.process_env(self.threads), window=(SKIP_STEPS, STEPS),
        )
        if rows[-1]["tokens"] != sum(self.tokens):
            raise AssertionError(f"sharpen trained on {rows[-1]['tokens']} tokens, the bench expected {sum(self.tokens)}")
        return RunResult(
            arm="sharpen", repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
            window_cpu_s=timing.window_cpu_s,
            losses=[r["loss"] for r in rows], step_times=[r["elapsed_s"] for r in rows],
            samples_per_step=[len(s) for s in self.order], tokens_per_step=self.tokens,
            padded_tokens_per_step=self.tokens,
        )

    def hf_config(self, out: Path) -> dict:
        """bench/hf_trainer.py's config for this job, writing into `out`."""
        return arms.hf_config(self.spec, model=self.model, dataset=self.hf_data, out=out, device="cpu",
                              threads=self.threads, lora=LORA)

    def run_hf(self, repeat: int) -> RunResult:
        timing, result = arms.run_hf(
            self.hf_config(self.work / "runs" / f"hf-{repeat}"), env=arms.process_env(self.threads),
            window=(SKIP_STEPS, STEPS),
        )
        return RunResult(
            arm="hf", repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
            window_cpu_s=timing.window_cpu_s, losses=result["losses"],
            step_times=result["step_times"], samples_per_step=[len(s) for s in self.order],
            tokens_per_step=self.tokens, padded_tokens_per_step=self.padded_tokens,
            extra={"threads_seen": result["threads"]},
        )


def summarise(results: list[RunResult]) -> dict:
    arms: dict[str, dict] = {}
    for name in dict.fromkeys(r.arm for r in results):
        runs = [r for r in results if r.arm == name]
        steady = [r.steady(SKIP_STEPS) for r in runs]
        arms[name] = {
            "samples_per_s": harness.spread([s["samples_per_s"] for s in steady]),
            "tokens_per_s": harness.spread([s["tokens_per_s"] for s in steady]),
            "computed_tokens_per_s": harness.spread([s["padded_tokens_per_s"] for s in steady]),
            "step_ms": harness.spread([s["step_ms"] for s in steady]),
            "cpu_ms_per_step": harness.spread([s["cpu_ms_per_step"] for s in steady]),
            "samples_per_cpu_s": harness.spread([s["samples_per_cpu_s"] for s in steady]),
            "wall_s": harness.spread([r.wall_s for r in runs]),
            "first_step_s": harness.spread([r.first_step_s for r in runs if r.first_step_s is not None]),
            "final_loss": harness.spread([r.losses[-1] for r in runs]),
        }
    ours = [r for r in results if r.arm == "sharpen"]
    theirs = [r for r in results if r.arm == "hf"]

    def pair_ratios(key: str) -> dict[str, float]:
        return harness.spread([
            a.steady(SKIP_STEPS)[key] / b.steady(SKIP_STEPS)[key] for a, b in zip(ours, theirs, strict=True)
        ])

    def median_ratio(key: str) -> float:
        return arms["sharpen"][key]["median"] / arms["hf"][key]["median"]

    return {
        "arms": arms,
        "ratio_samples_per_s": median_ratio("samples_per_s"),
        "ratio_per_repeat": pair_ratios("samples_per_s"),
        "ratio_samples_per_cpu_s": median_ratio("samples_per_cpu_s"),
        "ratio_per_cpu_s_per_repeat": pair_ratios("samples_per_cpu_s"),
        "ratio_wall": arms["hf"]["wall_s"]["median"] / arms["sharpen"]["wall_s"]["median"],
        "loss_max_rel_diff": max(harness.max_relative_difference(a.losses, b.losses) for a in ours for b in theirs),
        "loss_first_last": {
            "sharpen": [ours[0].losses[0], ours[0].losses[-1]],
            "hf": [theirs[0].losses[0], theirs[0].losses[-1]],
        },
    }


def format_table(summary: dict, repeats: int, threads: int) -> str:
    cell = harness.spread_cell
    header = [
        "", "samples/s", "tokens/s", "computed tok/s", "step ms", "CPU ms/step", "samples/CPU-s", "wall s",
        "1st step s", "final loss",
    ]
    rows = [header]
    for name, label in (("sharpen", "sharpen"), ("hf", "HF Trainer+PEFT")):
        a = summary["arms"][name]
        rows.append([
            label, cell(a["samples_per_s"], ".0f"), cell(a["tokens_per_s"], ".0f"),
            cell(a["computed_tokens_per_s"], ".0f"), cell(a["step_ms"], ".1f"), cell(a["cpu_ms_per_step"], ".1f"),
            cell(a["samples_per_cpu_s"], ".0f"), cell(a["wall_s"], ".1f"),
            cell(a["first_step_s"], ".1f"), f"{a['final_loss']['median']:.4f}",
        ])
    lines = harness.aligned_table(rows)
    ratio = summary["ratio_per_repeat"]
    lines += [
        "",
        f"median of {repeats} interleaved repeats (min-max), {threads} torch thread(s); rates over steps "
        f"{SKIP_STEPS + 1}-{STEPS}",
        f"sharpen / HF samples/s: {summary['ratio_samples_per_s']:.2f}x  "
        f"(per repeat pair {ratio['min']:.2f}-{ratio['max']:.2f}x; target >= 2x)",
        f"sharpen / HF samples per CPU-second: {summary['ratio_samples_per_cpu_s']:.2f}x  (per repeat pair "
        f"{summary['ratio_per_cpu_s_per_repeat']['min']:.2f}-{summary['ratio_per_cpu_s_per_repeat']['max']:.2f}x)",
        f"HF / sharpen wall time incl. start-up: {summary['ratio_wall']:.2f}x",
        f"loss curves, max relative difference over {STEPS} steps (every sharpen x HF pair): "
        f"{summary['loss_max_rel_diff']:.2e}",
    ]
    if ratio["max"] > 1.25 * ratio["min"]:
        lines.append(
            "note: the wall-clock ratio moved a lot between repeat pairs (others are using the cores): "
            "the samples per CPU-second ratio is the steady figure"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per arm (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for both arms (1: steady on a shared machine; the core count on a dedicated one)",
    )
    parser.add_argument("--json-out", type=Path, help="write the summary and every run's curves here")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-cpu",
        help="model, tokenized data and run dirs (the model is built once and reused)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"preparing in {args.work_dir} ...", flush=True)
    bench = CpuBench(args.work_dir.resolve(), args.threads)
    started, load_at_start = datetime.now(timezone.utc), os.getloadavg()[0]
    results = harness.interleave(
        [("sharpen", bench.run_sharpen), ("hf", bench.run_hf)], args.repeats, report=lambda s: print(s, flush=True)
    )
    summary = summarise(results)
    print()
    print(format_table(summary, args.repeats, args.threads))
    if args.json_out:
        harness.write_json(args.json_out, {
            "bench": "cpu", "date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": harness.machine(), "load_avg_1m_at_start": round(load_at_start, 2),
            "threads": args.threads, "repeats": args.repeats,
            "job": job_file(Path("MODEL"), Path("CACHE")), "skip_steps": SKIP_STEPS,
            "summary": summary, "runs": harness.results_as_dicts(results),
        })
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
