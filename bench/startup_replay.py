"""bench/startup.py's replay of `sharpen run`: the launcher's calls, then the rank's, timed one by one.

Run by startup.py in a fresh process (`startup.py _replay-run`), so every import is counted where it is
first made. Only the standard library at import: what sharpen imports is for the phases to count.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Named in a phase when it first appears in sys.modules during that phase: where the import time goes.
HEAVY_MODULES = ("numpy", "yaml", "pydantic", "torch", "pyarrow", "datasets", "transformers", "peft", "accelerate",
                 "bitsandbytes", "deepspeed", "psutil", "rich")


class Clock:
    """Phase timer of a replay process. `spawned_at` is the parent's time.time() right before it started
    this process and `first_line` the time.time() at bench/startup.py's first line, so the first phase is
    the interpreter's start-up, the next ones begin with startup.py's few stdlib imports."""

    def __init__(self, spawned_at: float, first_line: float):
        self.phases: dict[str, float] = {"python start-up to the script's first line": first_line - spawned_at}
        self.last = first_line
        self.loaded = {m for m in HEAVY_MODULES if m in sys.modules}

    def mark(self, name: str) -> None:
        now = time.time()
        new = [m for m in HEAVY_MODULES if m in sys.modules and m not in self.loaded]
        self.loaded.update(new)
        self.phases[name + (f" [imports {', '.join(new)}]" if new else "")] = now - self.last
        self.last = now

    def dump(self) -> None:
        print(json.dumps({"phases": self.phases}), flush=True)


def replay_run(spawned_at: float, first_line: float, job: str, scratch: str) -> None:
    """`sharpen run JOB` up to the end of step 1, call by call, in one process: the launcher's calls, then
    training/worker.py main()'s, as the rank forked from the launcher makes them (one CPU rank). Prints
    the phases as one JSON line."""
    clock = Clock(spawned_at, first_line)
    replay_launcher(clock, job, Path(scratch))
    replay_worker(clock, Path(scratch))
    clock.dump()


def replay_launcher(clock: Clock, job: str, run_dir: Path) -> None:
    """What `sharpen run JOB` does before it starts the rank, step by step."""
    import launcher.cli  # noqa: F401  (the console script's module: cluster.doctor, launcher.export, ...)

    clock.mark("import launcher.cli")
    from launcher.jobfile import load_job

    spec = load_job(job)
    clock.mark("load_job (YAML + validation)")
    from launcher.planner import build_plan
    from launcher.resume import prepare_resume
    from training.data.prepare import prepare_dataset

    clock.mark("import launcher.plan, launcher.resume, training.data")
    # launcher/prepare.py prepare_run, step by step, for a fresh run dir
    run_dir.mkdir(parents=True, exist_ok=True)
    plan, _ = build_plan(spec, run_dir)
    clock.mark("build_plan (strategy, batch, memory estimate)")
    prepare_resume(run_dir, None, plan)
    clock.mark("prepare_resume")
    cache = prepare_dataset(
        spec.data, spec.method.kind, spec.model.tokenizer or spec.model.path,
        trust_remote_code=spec.model.trust_remote_code, train_on=getattr(spec.method, "train_on", "all"),
    )
    clock.mark("prepare_dataset (cache key, cache hit)")
    plan.model_copy(update={"data_cache": str(Path(cache).resolve())}).write(run_dir)
    clock.mark("plan.json written")
    from cluster.local import launch  # noqa: F401

    clock.mark("import cluster.local")


def replay_worker(clock: Clock, run_dir: Path) -> None:
    """training/worker.py main() on RUN_DIR, timed call by call, through the end of the first step."""
    import torch

    from training import worker

    clock.mark("import training.worker (transformers, strategies, ...)")
    from launcher.plan import Plan

    plan = Plan.read(run_dir)
    spec = plan.spec
    env = worker.setup_distributed(plan, worker.from_environment())
    torch.manual_seed(spec.train.seed)
    from training.data.cache import load_prepared, load_prepared_eval
    from training.data.sampler import step_batches

    clock.mark("Plan.read, setup_distributed, import training.data")
    tokenizer = worker.load_tokenizer(spec)
    clock.mark("load_tokenizer")
    model = worker.load_model(spec, plan.compute_dtype, env.device)
    clock.mark("load_model (from_pretrained + LoRA)")
    strategy = worker.build_strategy(plan, env, model)
    clock.mark("build_strategy (setup, optimizer, scheduler)")
    dataset = load_prepared(Path(plan.data_cache))
    load_prepared_eval(Path(plan.data_cache))
    batches = step_batches(
        dataset, global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
        grad_accum=plan.grad_accum, rank=env.rank, world_size=env.world_size, seed=spec.train.seed,
        shuffle=spec.data.shuffle, padding_free=spec.data.padding_free, attention=spec.model.attention,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    clock.mark("load_prepared + step_batches")
    from training.flops import matmul_params, peak_flops

    model_ = strategy.unwrap()
    matmul_params(model_)
    columns = dataset.column_names
    if "length" in columns:
        dataset["length"]
    if "num_segments" in columns:
        dataset["num_segments"]
    clock.mark("flops_figures: FLOPs per token (reads the length column)")
    peak_flops(env.device, worker.TORCH_DTYPES[plan.compute_dtype])
    clock.mark("flops_figures: peak_flops (the matmul peak, cached per machine)")
    from training.metrics import WandbRun  # noqa: F401

    method = worker.make_method(plan, strategy, run_dir, dataset, None, False, tokenizer.pad_token_id or 0)
    clock.mark("make_method")
    step_batch = next(batches)
    micro = step_batch.micro_batches[0].to(env.device, dtype=strategy.options.compute_dtype)
    clock.mark("first batch (sample, collate, block-causal mask)")
    with strategy.accumulate(True):
        with strategy.forward_context():
            out = method(strategy.model, micro)
        strategy.backward(out.loss_sum * (1 / getattr(step_batch, method.normaliser)))
    clock.mark("first forward + backward")
    strategy.step()
    float(strategy.all_reduce_sum(out.loss_sum.detach().double()))
    clock.mark("first optimizer step (+ the logging sync)")
