"""The entry point of every rank: read RUN/plan.json, build strategy, model and data, train, write final/.

Started by the elastic agent as `python -m training.worker RUN_DIR` (or by srun, one task per rank).
"""

# ruff: noqa: E402  (the stop signals are taken before the imports)
from __future__ import annotations

import os

if os.environ.get("SLURM_JOB_ID"):
    # Before the seconds of imports below: a preemption's SIGTERM or an early USR2 is remembered from the
    # first moment (training/preemption.py acts on it at a step boundary) instead of killing a rank that
    # is still starting.
    from training.stop_signals import STOP_SIGNALS

    STOP_SIGNALS.install()

import atexit
import datetime
import logging
import sys
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from cluster.environment import ProcessEnv, from_environment, slurm_job
from cluster.requeue import stop_and_requeue
from cluster.slurm import STOP_FILE, TERM_FILE
from launcher.plan import Plan
from strategies import create_strategy
from strategies.base import DistEnv, StrategyOptions
from training import checkpoint, heartbeat, kernels
from training.env_hooks import PROBE_LOGITS
from training.kernels.attention import PER_SAMPLE_SDPA, collate_attention
from training.kernels.cpu_gemm import current_engine
from training.loop import LoopConfig, lr_lambda, run_steps
from training.methods import create_method
from training.model import TORCH_DTYPES, load_model, load_tokenizer
from training.trackers import Trackers

log = logging.getLogger("sharpen")


def redirect_output(run_dir: Path, rank: int) -> IO[str] | None:
    """Send this rank's stdout/stderr (Python and C level) to RUN/logs/rank-N.log. Rank 0 keeps a handle
    on the original terminal for the progress bar and short notices."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = None
    if rank == 0:
        console = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    log_fd = os.open(logs / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    return console


def notice(console: IO[str] | None, message: str) -> None:
    log.info(message)
    if console is not None:
        console.write(message + "\n")
        console.flush()


def setup_distributed(plan: Plan, penv: ProcessEnv) -> DistEnv:
    if plan.device == "cuda":
        torch.cuda.set_device(penv.local_rank)
        device = torch.device("cuda", penv.local_rank)
    else:
        device = torch.device("cpu")
    if penv.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", penv.master_addr)
        os.environ.setdefault("MASTER_PORT", str(penv.master_port))
        dist.init_process_group(
            backend=plan.backend,
            rank=penv.rank,
            world_size=penv.world_size,
            timeout=datetime.timedelta(seconds=plan.collective_timeout_s),
            device_id=device if plan.device == "cuda" else None,
        )
    return DistEnv(
        rank=penv.rank,
        local_rank=penv.local_rank,
        world_size=penv.world_size,
        local_world_size=penv.local_world_size,
        device=device,
        backend=plan.backend,
    )


def build_strategy(plan: Plan, env: DistEnv, model):
    """The plan's strategy, set up on `model` with the job's kernels (training/kernels/) and optimizer. Every
    rank calls it: the CPU matmul engine is agreed on here (a collective where rank 0 chooses it)."""
    spec = plan.spec
    t = spec.train
    options = StrategyOptions(
        compute_dtype=TORCH_DTYPES[plan.compute_dtype],
        micro_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        max_grad_norm=t.max_grad_norm,
        offload_optimizer=spec.strategy.offload in ("optimizer", "params"),
        offload_params=spec.strategy.offload == "params",
        reshard_after_forward=spec.strategy.reshard_after_forward,
        gradient_checkpointing=spec.model.gradient_checkpointing,
    )
    strategy = create_strategy(plan.strategy, options, env)
    kernels.agree_cpu_matmul(plan.cpu_matmul, spec.model.cpu_matmul, plan.compute_dtype, env)
    kernels.apply(model, strategy, compiled=spec.model.compile)

    # One kernel per tensor instead of ~10 ops each: on the CPU the default is the per-tensor Python loop
    # (no foreach kernels there). -1 ms of a 39 ms step on the CPU bench job. GPUs keep the foreach default.
    fused = env.device.type == "cpu"

    def make_optimizer(params):
        return torch.optim.AdamW(
            params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, fused=fused or None
        )

    def make_scheduler(optimizer):
        factor = lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    strategy.setup(model, make_optimizer, make_scheduler)
    return strategy


def make_method(plan: Plan, strategy, run_dir: Path, dataset, eval_dataset, resumed: bool, pad_token_id: int):
    """The job's loss; for DPO with its reference (training/methods/dpo.py), which may be precomputed here."""
    spec = plan.spec
    reference = None
    if spec.method.kind == "kto":  # its reference, labels and KL pairs (training/methods/kto.py)
        from training.methods.kto import build_kto_loss

        return build_kto_loss(strategy, spec, plan, run_dir, dataset, eval_dataset, resumed, pad_token_id)
    if spec.method.kind == "dpo":
        from training.methods.dpo_reference import build_reference

        reference = build_reference(strategy, spec, plan, run_dir, dataset, eval_dataset, resumed, pad_token_id)
    return create_method(spec.method.kind, spec.method, reference)


def rollout_steps(plan: Plan, strategy, loss, dataset, tokenizer, run_dir: Path, start_step: int, latest: Path | None,
                  trackers: Trackers):
    """GRPO's step batches (training/rollout/steps.py), with its reference when beta > 0."""
    from training.rollout.reference import build_reference
    from training.rollout.steps import RolloutSteps

    spec = plan.spec
    reference = build_reference(strategy, spec, plan.compute_dtype, loss) if spec.method.beta > 0 else None
    return RolloutSteps(
        strategy, loss, spec.method, dataset, tokenizer,
        global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
        seed=spec.train.seed, shuffle=spec.data.shuffle, start_step=start_step,
        attention=collate_attention(spec.model.attention, strategy.env.device), run_dir=run_dir,
        log_every=spec.logging.every, max_steps=spec.train.max_steps, reference=reference, resume_from=latest,
        gather=(plan.rollout or {}).get("gather", "forward"),
        merge_lora=bool((plan.rollout or {}).get("merge_lora")),
        on_logged=lambda rows, step: trackers.log_table("completions", rows, step),
    )


def row_split(plan: Plan, env: DistEnv, pad_token_id: int) -> dict:
    """Which rows this rank takes (its data-parallel rank and the number of such groups) and, with sequence
    parallelism (training/kernels/sequence_parallel.py), how its group's micro-batches are cut to its chunk.
    Every rank calls it: the groups are made by a collective."""
    from functools import partial

    from training.data.sequence_chunks import chunk_micro_batch
    from training.kernels.sequence_parallel import sequence_group

    group = sequence_group(plan.sequence_parallel, env.rank, env.world_size)
    return {
        "rank": group.data_rank(env.rank),
        "world_size": env.world_size // group.degree,
        "split_row": partial(chunk_micro_batch, group=group, pad_token_id=pad_token_id) if group.splits else None,
    }


def flops_figures(strategy, dataset, compute_dtype: torch.dtype) -> dict:
    """FLOPs per token of this model on this data, this rank's measured matmul peak (for MFU), and how
    to drop that peak from the cache where MFU shows it wrong."""
    from training.flops import forget_peak, matmul_params, peak_flops, train_flops_per_token

    model = strategy.unwrap()
    config = model.config
    trainable, frozen = matmul_params(model)
    # A token attends within its own sample (padding-free): the context is the mean sample length.
    columns = dataset.column_names
    lengths = dataset["length"] if "length" in columns else []
    segments = dataset["num_segments"] if "num_segments" in columns else [1] * len(lengths)
    mean_len = sum(lengths) / max(1, sum(segments))
    per_token = train_flops_per_token(trainable, frozen, config.num_hidden_layers, config.hidden_size, mean_len)
    device = strategy.env.device
    return {
        "flops_per_token": per_token,
        "peak_flops_per_rank": peak_flops(device, compute_dtype),
        "forget_peak": lambda: forget_peak(device, compute_dtype),
    }


def main(run_dir: str) -> int:
    run_dir = Path(run_dir)
    plan = Plan.read(run_dir)
    spec = plan.spec
    penv = from_environment()
    console = redirect_output(run_dir, penv.rank)
    heartbeat.start(run_dir, penv.rank, spec.train.hang_timeout_s)
    if spec.cluster.kind == "slurm" and spec.cluster.slurm.launch == "task_per_rank":
        # srun started this rank: no agent of sharpen's watches it, so it watches itself
        from cluster.hang_watch import HangWatch

        HangWatch(run_dir, own=True, on_own_hang=lambda report: notice(console, report)).__enter__()
    env = setup_distributed(plan, penv)
    torch.manual_seed(spec.train.seed)

    from training.data.cache import load_prepared, load_prepared_eval
    from training.data.sampler import prepared_mix, step_batches

    tokenizer = load_tokenizer(spec)
    heartbeat.beat()
    model = load_model(spec, plan.compute_dtype, env.device)
    heartbeat.beat()
    strategy = build_strategy(plan, env, model)
    heartbeat.beat()
    if plan.cpu_matmul is None:  # auto, left open by the planner (other machines): record rank 0's choice
        plan = plan.model_copy(update={"cpu_matmul": current_engine()})
        if env.is_main:
            plan.write(run_dir)

    start_step, state = 0, {}
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        start_step, path = latest
        state = checkpoint.load(path, strategy)
        heartbeat.beat()
        notice(console, f"resumed from {path} (step {start_step})")

    dataset = load_prepared(Path(plan.data_cache))
    eval_dataset = load_prepared_eval(Path(plan.data_cache))
    attention = collate_attention(spec.model.attention, env.device)
    rows = row_split(plan, env, tokenizer.pad_token_id or 0)
    if rows["split_row"] is not None:
        attention = PER_SAMPLE_SDPA  # segments, not a mask: the whole row's samples travel with each chunk
        notice(console, f"sequence parallelism: each row split over {plan.sequence_parallel} ranks "
               f"(all-to-all around attention), {rows['world_size']} data-parallel group(s)")
    batches = None if spec.method.kind == "grpo" else step_batches(
        dataset,
        global_batch_size=plan.global_batch_size,
        micro_batch_size=plan.micro_batch_size,
        grad_accum=plan.grad_accum,
        **rows,
        seed=spec.train.seed,
        shuffle=spec.data.shuffle,
        padding_free=spec.data.padding_free,
        attention=attention,
        start_step=start_step,
        pad_token_id=tokenizer.pad_token_id or 0,
        mix=prepared_mix(Path(plan.data_cache), [f.weight for f in spec.data.train]),
    )
    trackers = Trackers.start(run_dir, plan, start_step) if env.is_main else Trackers()
    atexit.register(trackers.finish, "FAILED")  # a rank that raises ends its trackers' runs as failed
    cfg = LoopConfig(
        max_steps=spec.train.max_steps,
        log_every=spec.logging.every,
        save_every=spec.train.save_every,
        keep_last=spec.train.keep_last,
        world_size=env.world_size,
        show_progress=spec.logging.progress,
        checkpoint_meta={"job_hash": plan.job_hash, "sharpen_version": plan.sharpen_version},
        checkpoint_estimate=plan.checkpoint_bytes,
        **flops_figures(strategy, dataset, TORCH_DTYPES[plan.compute_dtype]),
    )
    if slurm_job() is not None:  # stop together when SLURM asks (USR2, SIGTERM), checkpoint, requeue
        from training.preemption import stop_request

        slurm = spec.cluster.slurm
        cfg.should_stop = stop_request(strategy, run_dir / STOP_FILE, run_dir / TERM_FILE, plan.stop_grace_s)

        def stop(step: int, path: Path | None, request):
            stop_and_requeue(run_dir, step, path, request, env.is_main, console, allowed=slurm.requeue,
                             max_requeues=slurm.max_requeues)

        cfg.on_stop = stop
    from training.samples import EvalSamples

    samples = EvalSamples.for_run(spec.method.kind, spec.logging.samples, strategy, eval_dataset, tokenizer, run_dir)
    if samples is not None:  # the eval prompts' completions before the first step, or a resumed run's read back
        samples.before_training(fresh=latest is None)
    last = {}
    if start_step < spec.train.max_steps:
        method = make_method(plan, strategy, run_dir, dataset, eval_dataset, start_step > 0, tokenizer.pad_token_id or 0)
        if spec.method.kind == "grpo":  # the step batches are generated by the policy as it trains
            batches = rollout_steps(plan, strategy, method, dataset, tokenizer, run_dir, start_step,
                                    None if latest is None else latest[1], trackers)
            cfg.checkpoint_extra = batches.save
        if eval_dataset is not None and spec.train.eval_every:
            from training.evaluate import Evaluator

            cfg.evaluate = Evaluator(
                strategy, method, eval_dataset, spec.train.eval_every, spec.train.max_steps,
                micro_batch_size=plan.micro_batch_size, padding_free=spec.data.padding_free,
                attention=attention, pad_token_id=tokenizer.pad_token_id or 0, row_offset=len(dataset), **rows,
            )
        heartbeat.beat()
        last = run_steps(cfg, strategy, method, batches, start_step, run_dir, console, trackers, state)
        heartbeat.beat("checkpoint")
        final_state = {**cfg.checkpoint_meta, "tokens_seen": last.get("tokens", 0), **trackers.state()}
        checkpoint.save(run_dir, spec.train.max_steps, strategy, final_state, spec.train.keep_last, cfg.checkpoint_extra,
                        cfg.checkpoint_estimate)

    from training.export import save_probe_logits, write_final

    heartbeat.beat("final")
    write_final(strategy, tokenizer, run_dir / "final", peft=spec.finetune.type != "full")
    if os.environ.get(PROBE_LOGITS):
        save_probe_logits(strategy, os.environ[PROBE_LOGITS], len(tokenizer))
    if samples is not None:
        samples.after_training(spec.train.max_steps)
    strategy.barrier()
    trackers.finish("FINISHED")
    if env.is_main:
        from training.report import write_report

        extra = {"peak_tflops_per_rank": cfg.peak_flops_per_rank / 1e12}
        if env.device.type == "cuda":
            extra["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 1024**3
        if spec.model.compile:
            from torch._dynamo.utils import counters

            extra["compiled_graphs"] = counters["stats"]["unique_graphs"]
        write_report(run_dir, plan.model_dump(), extra)
    if last and env.is_main:
        notice(console, f"done: step {last['step']}, loss {last['loss']:.4f}; output in {run_dir / 'final'}")
    strategy.teardown()
    if dist.is_initialized():
        dist.destroy_process_group()
    heartbeat.stop()
    if console is not None:
        console.flush()
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    code = record(main)(sys.argv[1])
    if code is None:  # main ended by sys.exit(0), which record() swallows: a stop request (cluster/requeue.py)
        sys.exit(0)
    # A finished run: everything is written, closed and the process group destroyed. Skip the interpreter's
    # teardown, as a forked rank (multiprocessing) does: C++ threads torn down there can abort the finished
    # rank (seen once in the suite: a 2-rank fsdp rank died of SIGABRT, "terminate called without an active
    # exception", after its last checkpoint and final/ were written), which fails the whole run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
