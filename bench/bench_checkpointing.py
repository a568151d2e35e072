"""Activation checkpointing on the CPU bench job: none, selective and full, interleaved.

    python bench/bench_checkpointing.py [--repeats 3] [--threads 1] [--json-out FILE]

The job is bench_cpu.py's (bench/README.md), run through `sharpen run` with `--set
model.gradient_checkpointing=MODE`, the modes interleaved A B C A B C. Per mode: wall and CPU ms a step
over steps 6-60 (median of the repeats), the loss curve's largest relative difference from `none`'s, and
the bytes the graph keeps for the backward at the end of each step's forward and loss. Those are counted
in this process, on the model a rank builds (training/model.py, training/worker.py: the fused LoRA
linear, oneDNN where picked, the pruned last layer), over the job's first MEMORY_STEPS batches, by the
CPU allocator: checkpointing keeps its tensors where saved-tensor hooks do not see them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench import arms, harness  # noqa: E402
from bench.bench_cpu import MICRO_BATCH, SKIP_STEPS, STEPS, build_model, job_file  # noqa: E402
from bench.harness import RunResult  # noqa: E402
from tests.support.memory import allocated_during  # noqa: E402

MODES = ("none", "selective", "full")
MEMORY_STEPS = 10


class CheckpointingBench:
    def __init__(self, work: Path, threads: int):
        from launcher.jobfile import load_job
        from training.data.cache import load_prepared
        from training.data.prepare import prepare_dataset

        self.work, self.threads = work, threads
        self.model = build_model(work)
        self.job_path = work / "job.yaml"
        self.job_path.write_text(yaml.safe_dump(job_file(self.model, work / "tokenized"), sort_keys=False))
        self.spec = load_job(self.job_path)
        data = self.spec.data
        self.dataset = load_prepared(
            prepare_dataset(data, self.spec.method.kind, str(self.model), train_on=self.spec.method.train_on)
        )

    def arm(self, mode: str):
        def run(repeat: int) -> RunResult:
            timing, rows = arms.run_sharpen(
                self.job_path, self.work / "runs" / f"{mode}-{repeat}", steps=STEPS,
                env=arms.process_env(self.threads), window=(SKIP_STEPS, STEPS),
                overrides=[f"model.gradient_checkpointing={mode}"],
            )
            seen = [r["tokens"] for r in rows]  # tokens so far
            return RunResult(
                arm=mode, repeat=repeat, wall_s=timing.wall_s, first_step_s=timing.first_step_s,
                window_cpu_s=timing.window_cpu_s, losses=[r["loss"] for r in rows],
                step_times=[r["elapsed_s"] for r in rows], samples_per_step=[MICRO_BATCH] * STEPS,
                tokens_per_step=[b - a for a, b in zip([0, *seen], seen, strict=False)],
            )

        return run

    def held_for_backward(self, mode: str) -> list[int]:
        """Bytes held at the end of the forward and loss of each of the first MEMORY_STEPS steps."""
        import torch

        from launcher.planner import build_plan
        from strategies.base import DistEnv
        from training.data.sampler import step_batches
        from training.kernels.attention import collate_attention
        from training.methods.causal_lm import CausalLMLoss
        from training.model import load_model, load_tokenizer
        from training.worker import build_strategy

        spec = self.spec.model_copy(
            update={"model": self.spec.model.model_copy(update={"gradient_checkpointing": mode})}
        )
        plan = build_plan(spec, self.work / "runs" / "unused", device="cpu")[0]
        torch.manual_seed(spec.train.seed)
        strategy = build_strategy(plan, DistEnv(), load_model(plan.spec, plan.compute_dtype, torch.device("cpu")))
        loss_fn, held = CausalLMLoss(), []
        batches = step_batches(  # as training/worker.py asks for them on one CPU rank
            self.dataset, global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
            grad_accum=plan.grad_accum, rank=0, world_size=1, seed=spec.train.seed, shuffle=spec.data.shuffle,
            padding_free=spec.data.padding_free, attention=collate_attention(spec.model.attention, "cpu"),
            pad_token_id=load_tokenizer(spec).pad_token_id or 0,
        )
        for step in range(MEMORY_STEPS + 1):  # step 0 warms up (lazy initialisations, oneDNN kernels)
            micro = next(batches).micro_batches[0]
            def forward_and_loss(micro=micro):
                with strategy.forward_context():
                    return loss_fn(strategy.model, micro).loss_sum

            loss, allocated = allocated_during(forward_and_loss)
            strategy.backward(loss)
            strategy.model.zero_grad(set_to_none=True)
            if step:
                held.append(allocated[-1])
        strategy.teardown()
        return held


def summarise(results: list[RunResult], held: dict[str, list[int]]) -> dict:
    reference = [r for r in results if r.arm == "none"]
    modes = {}
    for mode in MODES:
        runs = [r for r in results if r.arm == mode]
        steady = [r.steady(SKIP_STEPS) for r in runs]
        modes[mode] = {
            "step_ms": harness.spread([s["step_ms"] for s in steady]),
            "cpu_ms_per_step": harness.spread([s["cpu_ms_per_step"] for s in steady]),
            "held_for_backward_bytes": {"median": statistics.median(held[mode]), "per_step": held[mode]},
            "loss_max_rel_diff_to_none": max(
                harness.max_relative_difference(r.losses, n.losses) for r in runs for n in reference
            ),
            "final_loss": runs[0].losses[-1],
        }
    for mode in MODES:
        none = modes["none"]
        modes[mode]["cpu_ms_vs_none"] = modes[mode]["cpu_ms_per_step"]["median"] / none["cpu_ms_per_step"]["median"]
        modes[mode]["held_vs_none"] = (
            modes[mode]["held_for_backward_bytes"]["median"] / none["held_for_backward_bytes"]["median"]
        )
    return modes


def format_table(summary: dict, repeats: int, threads: int) -> str:
    cell = harness.spread_cell
    rows = [["gradient_checkpointing", "step ms", "CPU ms/step", "x none", "held for backward", "x none",
             "loss vs none"]]  # fmt: skip
    for mode, m in summary.items():
        rows.append([
            mode, cell(m["step_ms"], ".1f"), cell(m["cpu_ms_per_step"], ".1f"), f"{m['cpu_ms_vs_none']:.3f}",
            f"{m['held_for_backward_bytes']['median'] / 2**20:.2f} MiB", f"{m['held_vs_none']:.3f}",
            f"{m['loss_max_rel_diff_to_none']:.1e}",
        ])
    lines = harness.aligned_table(rows)
    lines += [
        "",
        f"median of {repeats} interleaved repeats (min-max), {threads} torch thread(s); times over steps "
        f"{SKIP_STEPS + 1}-{STEPS}; held for backward: median over steps 1-{MEMORY_STEPS}, in-process; "
        "loss vs none: the largest relative difference of any run's loss curve from any `none` run's",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    parser.add_argument("--json-out", type=Path, help="write the summary and every run's curves here")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-cpu",
        help="model, tokenized data and run dirs (shared with bench_cpu.py; the model is built once)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"preparing in {args.work_dir} ...", flush=True)
    bench = CheckpointingBench(args.work_dir.resolve(), args.threads)
    started, load_at_start = datetime.now(timezone.utc), os.getloadavg()[0]
    results = harness.interleave(
        [(mode, bench.arm(mode)) for mode in MODES], args.repeats, report=lambda s: print(s, flush=True)
    )
    import torch

    torch.set_num_threads(args.threads)
    held = {mode: bench.held_for_backward(mode) for mode in MODES}
    summary = summarise(results, held)
    print()
    print(format_table(summary, args.repeats, args.threads))
    if args.json_out:
        harness.write_json(args.json_out, {
            "bench": "checkpointing-cpu", "date": started.isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "machine": harness.machine(),
            "load_avg_1m_at_start": round(load_at_start, 2), "threads": args.threads, "repeats": args.repeats,
            "job": job_file(Path("MODEL"), Path("CACHE")), "skip_steps": SKIP_STEPS, "memory_steps": MEMORY_STEPS,
            "summary": summary, "runs": harness.results_as_dicts(results),
        })
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
