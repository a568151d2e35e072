"""Start-up benchmark: `sharpen run` from process start to the end of its first optimizer step, beside a
bare script doing the same (bench/bare_first_step.py), interleaved; then where sharpen's start-up goes.

    python bench/startup.py [--repeats 5] [--threads 1] [--json-out startup.json]

The job is bench_cpu.py's (the ~4M-parameter bench Llama, LoRA r=8 alpha=16 all-linear, fp32, 1 CPU
rank, batch 8, alpaca_tiny.jsonl) with max_steps 6, so its first step is the bench job's first step.
Both arms train on the same first batch (sharpen's packed row, handed to the bare script as tensors)
with the same weights, adapter init and learning rate, and the bench checks their step-1 losses agree.

What is measured (every time is time.time(), the wall clock, from `t0`, read by this process right
before it starts the arm's process):

- sharpen: the end of step 1 is the modification time of RUN/metrics.jsonl while it holds its first row
  (logging.every=1: the row is written and flushed right after the step's optimizer step and its one
  host sync). That row's `elapsed_s` (training/metrics.py Throughput, started when run_steps begins)
  splits off the step itself. Earlier milestones, watched from outside every 10 ms: plan.json's mtime
  (the launcher has validated, planned and found the tokenized data); the rank's process creation
  (psutil; taken relative to the launcher's own creation time, so /proc's 1-second boot-time rounding
  cancels; one CPU rank is forked from the launcher, more are spawned by the elastic agent);
  RUN/logs/rank-0.log appearing (the rank has imported its modules and read plan.json).
- bare: the script's own time.time() stamps at its first line, after imports, after model load + LoRA,
  and after the optimizer step.

Then `--phase-repeats` replays of `sharpen run`, each in a fresh process with the same threads, time its
steps one by one with sharpen's own functions: the launcher's, then the rank's as training/worker.py
main() calls them, up to and including the first step, in the same process (the rank is forked from the
launcher, so it inherits the launcher's modules), so the outside milestones can be split further.

sharpen's caches are warm in every arm run, as on any run after a machine's first: the tokenized data, and
the measured matmul peak (training/flops.py peak_flops, ~/.cache/sharpen/peak_flops.json), which `prepare`
measures once for the bench's thread count if it is not there yet.
"""

from __future__ import annotations

import time

T_FIRST_LINE = time.time()  # the replays count the interpreter's start-up up to here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

STEPS = 6  # bench_cpu's job with warmup 5 needs max_steps > 5; only step 1 is measured
# bench/ modules are imported inside the functions: in a replay process (`_replay-run`) what this file
# imports before the replay starts counts in its first phase, so it stays the standard library.


# ---------------------------------------------------------------------------------------------- set-up


def prepare(work: Path, threads: int) -> dict:
    """Model, job file, tokenized data (so sharpen hits its cache) and the first batch as tensors."""
    import torch
    import yaml

    from bench import bench_cpu
    from launcher.jobfile import load_job
    from training.data.cache import load_prepared
    from training.data.prepare import prepare_dataset
    from training.data.sampler import step_batches
    from training.loop import lr_lambda

    model = bench_cpu.build_model(work)
    job = bench_cpu.job_file(model, work / "tokenized")
    job["name"] = "bench-startup"
    job["train"]["max_steps"] = STEPS
    job_path = work / "job.yaml"
    job_path.write_text(yaml.safe_dump(job, sort_keys=False))
    spec = load_job(job_path)
    cache = prepare_dataset(spec.data, spec.method.kind, str(model), train_on=spec.method.train_on)
    dataset = load_prepared(cache)
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(model).pad_token_id or 0
    batches = step_batches(
        dataset, global_batch_size=bench_cpu.MICRO_BATCH, micro_batch_size=bench_cpu.MICRO_BATCH, grad_accum=1,
        rank=0, world_size=1, seed=spec.train.seed, shuffle=spec.data.shuffle, padding_free=spec.data.padding_free,
        attention=spec.model.attention, pad_token_id=pad_id,
    )
    first = next(batches).micro_batches[0]
    warm_peak_flops_cache(threads)
    batch_path = work / "first_batch.pt"
    torch.save(
        {"input_ids": first.input_ids, "position_ids": first.position_ids, "labels": first.labels,
         "attention_mask": first.attention_mask},
        batch_path,
    )
    t = spec.train
    lr_step1 = t.lr * lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps, t.min_lr_ratio)(0)
    return {
        "job": job_path, "model": model, "batch": batch_path, "seed": t.seed, "threads": threads,
        "optimizer": {"lr": lr_step1, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
                      "max_grad_norm": t.max_grad_norm},
        "first_batch": {"samples": first.num_samples, "tokens": first.num_tokens, "label_tokens": first.num_label_tokens},
    }


def warm_peak_flops_cache(threads: int) -> None:
    """Measure the CPU's fp32 matmul peak at `threads` into sharpen's cache, unless it is there already."""
    import torch

    from training.flops import peak_flops

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    peak_flops(torch.device("cpu"), torch.float32)
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------------- arms


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def run_sharpen(setup: dict, work: Path, repeat: int) -> dict:
    """One `sharpen run`: its end of step 1 and its milestones, watched from outside (seconds from t0)."""
    import psutil

    from bench import arms, harness

    run_dir = arms.fresh_dir(work / "runs" / f"sharpen-{repeat}")
    metrics, plan, rank_log = run_dir / "metrics.jsonl", run_dir / "plan.json", run_dir / "logs" / "rank-0.log"
    cmd = [*arms.sharpen_executable(), "run", str(setup["job"]), "--output-dir", str(run_dir)]
    marks: dict[str, float] = {}  # time.time() of each milestone; the worker's relative to the launcher's

    def poll(proc) -> bool:
        now = time.time()
        if "plan" not in marks and plan.exists():
            marks["plan"] = plan.stat().st_mtime
        if "worker" not in marks:
            for child in _children(proc):
                try:
                    # spawned by the agent (python -m training.worker), or forked (one CPU rank)
                    if "training.worker" in " ".join(child.cmdline()) or child.cmdline() == proc.cmdline():
                        # taken from the launcher's creation, so /proc's 1-second boot-time rounding cancels
                        marks["worker"] = child.create_time() - proc.create_time()
                        break
                except psutil.Error:
                    pass
        if "rank_log" not in marks and rank_log.exists():
            marks["rank_log"] = now
        if "first_row" not in marks and metrics.exists():
            with metrics.open("rb") as f:
                data = f.read()
            stat = metrics.stat()
            if data.count(b"\n") >= 1:
                # one row: the file's mtime is that row's write; more: fall back to this poll
                marks["first_row"] = stat.st_mtime if data.count(b"\n") == 1 else now
                marks["first_row_exact"] = float(data.count(b"\n") == 1)
                return True
        return False

    t0, wall = harness.run_watched(
        cmd, env=arms.process_env(setup["threads"]), log_file=run_dir.parent / f"sharpen-{repeat}.log", poll=poll,
        cwd=REPO, clock=time.time,
    )
    row = json.loads(metrics.read_text().splitlines()[0])
    if "first_row" not in marks or "worker" not in marks:
        raise RuntimeError(f"sharpen-{repeat}: missed a milestone ({sorted(marks)}); the machine may be too loaded")
    first = marks["first_row"] - t0
    return {
        "arm": "sharpen", "repeat": repeat, "first_step_s": first, "wall_s": wall, "loss": row["loss"],
        "exact": bool(marks["first_row_exact"]),
        "milestones": {
            "launcher_created": 0.0,  # t0 is taken as its creation
            "plan_written": marks["plan"] - t0,
            "worker_created": marks["worker"],
            "rank_log_opened": marks.get("rank_log", float("nan")) - t0,
            "run_steps_started": first - row["elapsed_s"],
            "first_step_done": first,
        },
    }


def run_bare(setup: dict, work: Path, repeat: int) -> dict:
    """One run of bare_first_step.py: its end of step 1 and its own stamps (seconds from t0)."""
    from bench import arms
    from bench.bench_cpu import LORA

    out = arms.fresh_dir(work / "runs" / f"bare-{repeat}")
    config = {
        "model": str(setup["model"]), "batch": str(setup["batch"]), "seed": setup["seed"],
        "threads": setup["threads"], "optimizer": setup["optimizer"], "output": str(out / "result.json"),
        "lora": LORA,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    cmd = [sys.executable, str(BENCH / "bare_first_step.py"), str(out / "config.json")]
    with (out / "bench.log").open("w") as log:
        t0 = time.time()
        rc = subprocess.run(
            cmd, env=arms.process_env(setup["threads"]), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ).returncode
        wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {out / 'bench.log'}")
    r = json.loads((out / "result.json").read_text())
    return {
        "arm": "bare", "repeat": repeat, "first_step_s": r["t_first_step"] - t0, "wall_s": wall, "loss": r["loss"],
        "exact": True,
        "milestones": {
            "script_started": r["t_start"] - t0,
            "imported": r["t_imported"] - t0,
            "model_loaded": r["t_loaded"] - t0,
            "first_step_done": r["t_first_step"] - t0,
        },
    }


# --------------------------------------------------------------------------- in-process phase replays


def run_replay(kind: str, args: list[str], threads: int) -> dict[str, float]:
    """One replay (bench/startup_replay.py) in a fresh process of this script: its phases, in seconds."""
    from bench import arms

    cmd = [sys.executable, str(Path(__file__).resolve()), f"_replay-{kind}"]
    spawned_at = time.time()
    proc = subprocess.run([*cmd, repr(spawned_at), *args], env=arms.process_env(threads), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"phases"')][-1]
    return json.loads(line)["phases"]


# --------------------------------------------------------------------------------------------- report


def med(values: list[float]) -> str:
    """Seconds as "median (min-max)"; a milestone that was missed (NaN) is left out."""
    from bench import harness

    return harness.median_cell(values, ".2f")


def report(results: list[dict], replays: dict[str, list[dict]], setup: dict, repeats: int) -> tuple[str, dict]:
    ours = [r for r in results if r["arm"] == "sharpen"]
    bare = [r for r in results if r["arm"] == "bare"]
    s_first = statistics.median(r["first_step_s"] for r in ours)
    b_first = statistics.median(r["first_step_s"] for r in bare)
    pairs = [a["first_step_s"] / b["first_step_s"] for a, b in zip(ours, bare, strict=True)]
    lines = [
        f"{'':<14}{'to end of step 1, s':>24}{'process wall, s':>24}{'step-1 loss':>14}",
        "-" * 76,
        f"{'sharpen run':<14}{med([r['first_step_s'] for r in ours]):>24}{med([r['wall_s'] for r in ours]):>24}"
        f"{statistics.median(r['loss'] for r in ours):>14.5f}",
        f"{'bare script':<14}{med([r['first_step_s'] for r in bare]):>24}{med([r['wall_s'] for r in bare]):>24}"
        f"{statistics.median(r['loss'] for r in bare):>14.5f}",
        "",
        f"median of {repeats} interleaved repeats (min-max); first batch {setup['first_batch']['samples']} samples, "
        f"{setup['first_batch']['tokens']} tokens, {setup['first_batch']['label_tokens']} label tokens",
        f"sharpen / bare, time to the end of step 1: {s_first / b_first:.2f}x  "
        f"(per repeat pair {min(pairs):.2f}-{max(pairs):.2f}x; target <= 1.2x)",
        f"step-1 loss, max |sharpen - bare| / bare: "
        f"{max(abs(a['loss'] - b['loss']) / abs(b['loss']) for a in ours for b in bare):.1e}",
    ]
    if not all(r["exact"] for r in ours):
        lines.append("note: in some sharpen runs step 2 was written before the poll saw step 1; that run's "
                     "end of step 1 is the poll time (late by up to a step)")

    # sharpen's milestones, as intervals
    names = [
        ("plan_written", "launcher: interpreter, CLI imports, load_job, plan, data-cache hit, plan.json"),
        ("worker_created", "launcher: the rank's process started (forked from the launcher)"),
        ("rank_log_opened", "rank: imports not yet made by the launcher (training.worker...), Plan.read"),
        ("run_steps_started", "rank: tokenizer, model + LoRA (peft), strategy, data, FLOPs + peak, method"),
        ("first_step_done", "rank: step 1 (batch, fwd, bwd, optimizer, log row; metrics elapsed_s)"),
    ]
    lines += ["", "sharpen, from `sharpen run` to the end of step 1 (seconds, median (min-max) over repeats):", ""]
    prev = None
    for key, label in names:
        values = [r["milestones"][key] - (r["milestones"][prev] if prev else 0.0) for r in ours]
        lines.append(f"  {med(values):>20}  {label}")
        prev = key
    lines.append(f"  {med([r['first_step_s'] for r in ours]):>20}  total")
    lines += ["", "bare script (seconds):", ""]
    prev = None
    for key, label in (
        ("script_started", "interpreter start-up to the script's first line"),
        ("imported", "import torch, transformers, peft"),
        ("model_loaded", "from_pretrained + get_peft_model"),
        ("first_step_done", "batch load, forward, backward, clip, AdamW step"),
    ):
        values = [r["milestones"][key] - (r["milestones"][prev] if prev else 0.0) for r in bare]
        lines.append(f"  {med(values):>20}  {label}")
        prev = key
    lines.append(f"  {med([r['first_step_s'] for r in bare]):>20}  total")
    summary = {
        "sharpen_first_step_s": s_first, "bare_first_step_s": b_first, "ratio": s_first / b_first,
        "ratio_per_pair": {"min": min(pairs), "max": max(pairs)},
    }
    for kind, runs in replays.items():
        if not runs:
            continue
        title = {"run": "replay of `sharpen run`: the launcher, then the rank's main() (fresh process each)"}[kind]
        lines += ["", f"{title}, seconds, median (min-max) of {len(runs)}:", ""]
        keys = list(runs[0])
        for k in keys:
            lines.append(f"  {med([r[k] for r in runs]):>20}  {k}")
        total = [sum(r[k] for k in keys) for r in runs]
        lines.append(f"  {med(total):>20}  total")
        summary[f"{kind}_replay"] = {k: statistics.median(r[k] for r in runs) for k in keys}
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_replay-run":
        from bench.startup_replay import replay_run

        replay_run(float(argv[1]), T_FIRST_LINE, argv[2], argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per arm (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both arms (1 on a shared machine)")
    parser.add_argument("--phase-repeats", type=int, default=3, help="in-process replays of `sharpen run`")
    parser.add_argument("--json-out", type=Path, help="write the summary and every run's milestones here")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sharpen-bench-startup",
        help="model, tokenized data and run dirs (the model is built once and reused)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"preparing in {work} ...", flush=True)
    setup = prepare(work, args.threads)
    from datetime import datetime, timezone

    from bench import harness

    started, load = datetime.now(timezone.utc), os.getloadavg()[0]
    results = []
    for repeat in range(args.repeats):
        for name, run in (("sharpen", run_sharpen), ("bare", run_bare)):
            r = run(setup, work, repeat)
            results.append(r)
            print(f"  repeat {repeat + 1}/{args.repeats} {name:<8} step 1 at {r['first_step_s']:5.2f} s, "
                  f"exit at {r['wall_s']:5.2f} s", flush=True)
    replays: dict[str, list[dict]] = {"run": []}
    for i in range(args.phase_repeats):
        scratch = work / "runs" / f"replay-{i}"
        shutil.rmtree(scratch, ignore_errors=True)
        replays["run"].append(run_replay("run", [str(setup["job"]), str(scratch)], args.threads))
        print(f"  replay {i + 1}/{args.phase_repeats} done", flush=True)
    text, summary = report(results, replays, setup, args.repeats)
    print()
    print(text)
    if args.json_out:
        harness.write_json(args.json_out, {
            "bench": "startup", "date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": harness.machine(), "load_avg_1m_at_start": round(load, 2), "threads": args.threads,
            "repeats": args.repeats, "summary": summary, "runs": results, "replays": replays,
        })
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
