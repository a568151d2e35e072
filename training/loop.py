"""The training loop: micro-steps, one normalised loss per step, logging and checkpoint cadence."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import torch

from strategies.base import Strategy
from training import checkpoint, faults, heartbeat
from training.forward import run_forward
from training.metrics import MetricsLog, Progress, Throughput
from training.preemption import StopRequest
from training.trackers import Trackers

log = logging.getLogger("sharpen")


@dataclass
class LoopConfig:
    max_steps: int
    log_every: int
    save_every: int
    keep_last: int
    world_size: int
    show_progress: bool = True
    checkpoint_meta: dict = field(default_factory=dict)  # job hash, sharpen version: written with each checkpoint
    # Preemption hooks from the worker (training/preemption.py): should_stop is polled on every rank after
    # every step and agreed through a collective; a StopRequest checkpoints the run at this step (unless it
    # came too late in a SIGTERM's grace period) and then calls on_stop(step, checkpoint dir or None,
    # request), which ends the process (on SLURM: requeue, cluster/requeue.py).
    should_stop: Callable[[], StopRequest | None] | None = None
    on_stop: Callable[[int, Path | None, StopRequest], NoReturn] | None = None
    # Evaluation hook (training/evaluate.py), called on every rank after every step: a row of eval/
    # metrics to log (rank 0 writes it), or None when this step has no evaluation.
    evaluate: Callable[[int], dict | None] | None = None
    # Model FLOPs per trained token and this rank's measured matmul peak (training/flops.py): MFU.
    flops_per_token: float = 0.0
    peak_flops_per_rank: float = 0.0
    # Drops the cached peak this run measured MFU against (training/flops.py forget_peak), so the next run
    # measures it again; called once, when MFU comes out above 1. Returns the cache file.
    forget_peak: Callable[[], Path] | None = None
    # A method's own files in each checkpoint (training/checkpoint.py save's `extra`): GRPO's generation batch.
    checkpoint_extra: Callable[[Path], None] | None = None
    checkpoint_estimate: int = 0  # a checkpoint's expected bytes before one exists (Plan.checkpoint_bytes)


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """LR multiplier per step: linear warmup, then cosine/linear decay to `min_ratio`, or constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def run_steps(
    cfg: LoopConfig,
    strategy: Strategy,
    method,
    batches: Iterator,
    start_step: int,
    run_dir: Path,
    console: IO[str] | None,
    trackers: Trackers,
    extra_state: dict,
) -> dict:
    """Train from `start_step` to `cfg.max_steps`. Returns the last logged row (rank 0) or {}. Rank 0 writes
    each logged row to metrics.jsonl and to `trackers` (training/trackers.py; the other ranks' hold none)."""
    env = strategy.env
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step) if env.is_main else None
    progress = Progress(cfg.max_steps, start_step, console, cfg.show_progress and env.is_main)
    throughput = Throughput()
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    tokens_seen = extra_state.get("tokens_seen", 0)
    loss_denominator = 0
    metric_sums: dict[str, torch.Tensor] = {}  # a method's extra metrics, summed like the loss
    # A method may divide its metrics by another count than its loss (GRPO: token means whatever its loss).
    metric_normaliser = getattr(method, "metric_normaliser", method.normaliser)
    metric_denominator = 0
    rollout_sums: dict[str, float] = {}  # GRPO's rollout metrics (already global): means over the logged steps
    rollout_counts: dict[str, int] = {}
    last_row: dict = {}
    should_stop = cfg.should_stop
    # A method that needs the whole step before its first micro-batch (KTO's reference point, over every rank).
    prepare_step = getattr(method, "prepare_step", None)
    peak_check = PeakCheck(cfg)
    try:
        for step in range(start_step + 1, cfg.max_steps + 1):
            step_batch = next(batches)
            if prepare_step is not None:
                prepare_step(strategy, step_batch)
            denominator = getattr(step_batch, method.normaliser)
            micro_batches = step_batch.micro_batches
            rollout = getattr(step_batch, "metrics", None)
            update_started = time.perf_counter() if rollout is not None else 0.0
            for i, micro in enumerate(micro_batches):
                heartbeat.beat("training", step, i)
                with strategy.accumulate(i == len(micro_batches) - 1):
                    out = run_forward(strategy, method, micro)
                    # Gradients are averaged over ranks by every strategy, hence × world size; dividing by
                    # the whole step's count (not the micro-batch's) keeps accumulation exact.
                    strategy.backward(out.loss_sum * (cfg.world_size / denominator))
                loss_sum += out.loss_sum.detach().double()
                for name, value in out.metric_sums.items():
                    metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
            grad_norm = strategy.step()
            heartbeat.beat(step=step, micro=len(micro_batches))
            if rollout is not None:  # a rollout step syncs with the host anyway (generation)
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                rollout = {**rollout, "time/update_s": time.perf_counter() - update_started}
                for name, value in rollout.items():
                    if value is not None:
                        rollout_sums[name] = rollout_sums.get(name, 0.0) + value
                        rollout_counts[name] = rollout_counts.get(name, 0) + 1
            tokens_seen += step_batch.global_tokens
            throughput.add(step_batch.global_tokens, step_batch.global_samples)

            loss_denominator += denominator
            metric_denominator += getattr(step_batch, metric_normaliser)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                # The only host sync of a step, and only on logging steps. The logged loss is the
                # token-weighted mean over the steps since the last log (exactly the step's loss when every=1).
                total = strategy.all_reduce_sum(loss_sum.clone())
                tokens_per_s, samples_per_s = throughput.rates()
                row = {
                    "step": step,
                    "loss": float(total) / loss_denominator,
                    "lr": strategy.current_lr(),
                    "grad_norm": float(grad_norm),
                    "tokens": tokens_seen,
                    "tokens_per_s": tokens_per_s,
                    "mfu": peak_check.mfu(tokens_per_s),
                    "samples_per_s": samples_per_s,
                    "elapsed_s": throughput.elapsed(),
                    "epoch": step_batch.epoch,
                }
                for name in sorted(metric_sums):
                    total_metric = float(strategy.all_reduce_sum(metric_sums[name].clone()))
                    row[name] = total_metric / max(metric_denominator, 1)
                for name in rollout_sums:
                    row[name] = rollout_sums[name] / rollout_counts[name]
                metric_sums.clear()
                rollout_sums.clear()
                rollout_counts.clear()
                metric_denominator = 0
                loss_sum.zero_()
                loss_denominator = 0
                if env.is_main:
                    metrics.write(row)
                    trackers.log(row)
                last_row = row
                progress.update(step, row)
            else:
                progress.update(step, None)
            eval_row = cfg.evaluate(step) if cfg.evaluate is not None else None
            heartbeat.beat("training")
            if eval_row and env.is_main:
                metrics.write(eval_row)
                trackers.log(eval_row)

            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
                heartbeat.beat("checkpoint")
                state = {**cfg.checkpoint_meta, "tokens_seen": tokens_seen, **trackers.state()}
                path = checkpoint.save(run_dir, step, strategy, state, cfg.keep_last, cfg.checkpoint_extra,
                                       cfg.checkpoint_estimate)
                log.info("checkpoint written: %s", path)
                heartbeat.beat("training")
            heartbeat.step_done(step)
            faults.maybe_kill("kill-after-step", step, env.rank)
            faults.maybe_hang("hang-after-step", step, env.rank)

            # -- a stop request: stop together at this step boundary, checkpoint, requeue (never returns) --
            request = should_stop() if should_stop is not None and step < cfg.max_steps else None
            if request is not None:
                saved = None
                if request.checkpoint:
                    if not (cfg.save_every and step % cfg.save_every == 0):
                        heartbeat.beat("checkpoint")
                        state = {**cfg.checkpoint_meta, "tokens_seen": tokens_seen, **trackers.state()}
                        checkpoint.save(run_dir, step, strategy, state, cfg.keep_last, cfg.checkpoint_extra,
                                        cfg.checkpoint_estimate)
                    saved = checkpoint.checkpoints_dir(run_dir) / f"step-{step}"
                trackers.finish("KILLED")  # resumed (requeued) later, as the same runs
                cfg.on_stop(step, saved, request)
        return last_row
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()


def mfu(cfg: LoopConfig, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model's math needs per second, per rank, over the rank's
    measured dense matmul rate in the compute dtype. Unclipped: above 1 means the peak was measured low."""
    if not cfg.flops_per_token or not cfg.peak_flops_per_rank:
        return None
    return cfg.flops_per_token * tokens_per_s / cfg.world_size / cfg.peak_flops_per_rank


class PeakCheck:
    """The MFU a row logs: None where it comes out above 1, which no run reaches: the peak was measured
    while the cores were busy, or on other hardware. The first time, the rank's log says so and the
    cached peak is dropped (cfg.forget_peak), so the next run measures it again."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.doubted = False

    def mfu(self, tokens_per_s: float) -> float | None:
        value = mfu(self.cfg, tokens_per_s)
        if value is None or value <= 1:
            return value
        if not self.doubted:
            self.doubted = True
            where = self.cfg.forget_peak() if self.cfg.forget_peak is not None else None
            log.warning(
                "MFU came out at %.2f: the measured matmul peak, %.3g GFLOP/s per rank%s, looks wrong "
                "(measured while the cores were busy?). MFU is logged as null for this run; the peak "
                "is dropped from the cache and will be re-measured on the next run.",
                value, self.cfg.peak_flops_per_rank / 1e9, f" (from {where})" if where else "",
            )
        return None
