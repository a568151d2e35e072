"""Where a step's time goes: the CPU bench job under torch.profiler, per arm, grouped by kind of work.

    python bench/profile_cpu.py [--arm sharpen|hf|both] [--threads 1] [--top 15]

Runs in this process (no launcher, no start-up): sharpen's own loop (training.loop.run_steps with the
single strategy, step_batches and the SFT method, as training/worker.py wires them), and the HF Trainer
exactly as bench/hf_trainer.py builds it. Steps 1-5 warm up; steps 6-60 are profiled. The profiler adds
overhead to every op, so read the shares, not the absolute times; bench_cpu.py gives the real rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.bench_cpu import MICRO_BATCH, SKIP_STEPS, STEPS, CpuBench  # noqa: E402

DATA_REGION = "bench: next batch (sampling + collate)"
# (category, test on the op name); the first that matches wins. Self times, so nothing counts twice.
CATEGORIES = [
    ("data (step_batches + collate, python)", lambda n: n == DATA_REGION),
    ("matmul (linear layers, LoRA, lm_head)", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention (sdpa fwd + bwd)", lambda n: "scaled_dot_product" in n or "attention" in n),
    ("loss (log_softmax + nll, fwd + bwd)", lambda n: "log_softmax" in n or "nll_loss" in n),
    ("optimizer + clip (AdamW, norms)", lambda n: n.startswith("Optimizer.") or "_foreach" in n or "norm" in n),
    ("autograd engine bookkeeping", lambda n: n.startswith("autograd::")),
    ("other aten ops (elementwise, copies, views)", lambda n: n.startswith("aten::")),
]


def categorise(events) -> dict[str, float]:
    """Self microseconds per category (the profiler's clock). Self times: nothing counts twice."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = next((c for c, test in CATEGORIES if test(e.key)), "other recorded regions")
        out[name] += e.self_cpu_time_total
    return out


class Window:
    """Starts the profiler before step SKIP_STEPS + 1 and stops it after step STEPS."""

    def __init__(self):
        import torch

        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.cpu = self.wall = 0.0

    def start(self) -> None:
        self.profiler.start()
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def stop(self) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall
        self.profiler.stop()


def profile_sharpen(bench: CpuBench, work: Path) -> Window:
    import torch
    from torch.profiler import record_function

    from launcher.planner import build_plan
    from strategies.base import DistEnv
    from training.data.cache import load_prepared
    from training.data.prepare import prepare_dataset
    from training.data.sampler import step_batches
    from training.kernels.attention import collate_attention
    from training.loop import LoopConfig, run_steps
    from training.methods import create_method
    from training.model import load_model, load_tokenizer
    from training.trackers import Trackers
    from training.worker import build_strategy

    spec, run_dir = bench.spec, work / "profile-sharpen"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    plan, _ = build_plan(spec, run_dir)
    env = DistEnv()
    torch.manual_seed(spec.train.seed)
    tokenizer = load_tokenizer(spec)
    strategy = build_strategy(plan, env, load_model(spec, plan.compute_dtype, env.device))
    cache = prepare_dataset(spec.data, spec.method.kind, str(bench.model), train_on=spec.method.train_on)
    batches = step_batches(
        load_prepared(cache), global_batch_size=MICRO_BATCH, micro_batch_size=MICRO_BATCH, grad_accum=1,
        rank=0, world_size=1, seed=spec.train.seed, shuffle=spec.data.shuffle, padding_free=spec.data.padding_free,
        attention=collate_attention(spec.model.attention, env.device), pad_token_id=tokenizer.pad_token_id or 0,
    )
    window = Window()

    def timed(batches):
        for step in range(STEPS):
            if step == SKIP_STEPS:
                window.start()
            with record_function(DATA_REGION):
                batch = next(batches)
            yield batch

    cfg = LoopConfig(max_steps=STEPS, log_every=1, save_every=0, keep_last=1, world_size=1, show_progress=False)
    run_steps(cfg, strategy, create_method("sft"), timed(batches), 0, run_dir, None, Trackers(), {})
    window.stop()
    return window


def profile_hf(bench: CpuBench, work: Path) -> Window:
    from torch.profiler import record_function
    from transformers import DataCollatorForSeq2Seq, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from bench.hf_trainer import build_trainer

    cfg = bench.hf_config(work / "profile-hf")
    window = Window()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == SKIP_STEPS:
                window.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS:
                window.stop()

    trainer = build_trainer(cfg, [Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step log lines are noise here
    collator = trainer.data_collator

    class Collator(DataCollatorForSeq2Seq):  # the same collator, its calls marked for the profiler
        def __call__(self, features, return_tensors=None):
            with record_function(DATA_REGION):
                return collator(features, return_tensors)

    trainer.data_collator = Collator(collator.tokenizer, padding=True, label_pad_token_id=-100)
    trainer.train()
    return window


def report(name: str, window: Window, top: int) -> dict:
    """Print the categories as ms/step and as shares of the time spent inside recorded ops.

    The profiler times ops by the wall clock, so on a busy machine an op's time includes waits for a
    core; the shares stay meaningful (waits fall on ops in proportion to their length), the absolute
    times do not. The wall time outside every recorded op is Python and framework code (plus waiting).
    """
    steps = STEPS - SKIP_STEPS
    events = window.profiler.key_averages()
    cats = categorise(events)
    inside = sum(cats.values())
    outside = window.wall * 1e6 - inside
    print(f"\n== {name}: {1000 * window.cpu / steps:.1f} CPU ms/step, {1000 * window.wall / steps:.1f} wall ms/step "
          f"(profiled, steps {SKIP_STEPS + 1}-{STEPS}); inside recorded ops {inside / 1000 / steps:.1f} ms/step")
    for cat, us in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {us / 1000 / steps:7.2f} ms  {100 * us / inside:5.1f}%  {cat}")
    print(f"  {outside / 1000 / steps:7.2f} ms   wall time outside recorded ops (Python, framework; waits for a core)")
    print(f"  top {top} ops by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.self_cpu_time_total / 1000 / steps:7.2f} ms  {e.count / steps:6.1f} calls/step  {e.key[:70]}")
    return {
        "cpu_ms_per_step": 1000 * window.cpu / steps, "wall_ms_per_step": 1000 * window.wall / steps,
        "categories_ms_per_step": {c: us / 1000 / steps for c, us in cats.items()},
        "outside_ops_ms_per_step": outside / 1000 / steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=("sharpen", "hf", "both"), default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-cpu")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    bench = CpuBench(args.work_dir.resolve(), args.threads)
    results = {}
    if args.arm in ("sharpen", "both"):
        results["sharpen"] = report("sharpen", profile_sharpen(bench, bench.work), args.top)
    if args.arm in ("hf", "both"):
        results["hf"] = report("HF Trainer + PEFT", profile_hf(bench, bench.work), args.top)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
