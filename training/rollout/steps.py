"""GRPO's step batches: each step's prompts, their completions, rewards and advantages, as micro-batches.

`RolloutSteps` is what the loop reads for a grpo job instead of `step_batches`. For each generation batch
(a new one every `num_iterations` steps) it

1. draws the prompts (`step_prompts`: the same on every rank and world size) and lays out their
   completions prompt-major, `num_generations` per prompt; rank r takes the r-th contiguous share;
2. generates its share with the policy as the strategy holds it (training/rollout/generate.py), each
   completion seeded by (seed, generation batch, prompt row, generation index), so 1 rank or 8 and a
   resumed run generate the same tokens; under FSDP2 / ZeRO-3 the ranks decode in lockstep;
3. scores them (training/rollout/scoring.py) and sums the step's rewards and lengths over the ranks, so
   that every rank computes the same group advantages (training/methods/grpo_advantages.py) and the
   step's global completion counts (what the loss is divided by);
4. computes, once per generation batch, the old policy's token log-probabilities (num_iterations > 1)
   and the reference's (beta > 0), and builds the micro-batches.

With num_iterations > 1 the generation batch outlives a step: a checkpoint inside it keeps each rank's
share (`save` / `restore`), and a resume on any world size reassembles the whole batch and re-slices it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.data.prompts import PromptSample, read_prompt
from training.data.sampler import StepBatch, step_prompts
from training.forward import run_forward
from training.methods.grpo import CompletionCounts, GRPOLoss, completion_micro_batches
from training.methods.grpo_advantages import group_advantages
from training.rollout.generate import SamplingSettings, all_ranks_done, generate, group_keys
from training.rollout.scoring import RewardScorer

log = logging.getLogger("sharpen")

COMPLETIONS_FILE = "completions.jsonl"
ROLLOUT_FILE = "rollout-rank{rank}.pt"
LOGGED_PER_STEP = 64  # completions kept in RUN/completions.jsonl per logged step
LOGGED_AT_MOST = 20_000  # and in all


@dataclass
class RolloutBatch(StepBatch):
    """A StepBatch of completions: the global counts each GRPO loss type divides by, and the rollout's
    metrics (the same on every rank but the timings, which are this rank's)."""

    global_completions: int = 0
    global_completion_tokens: int = 0
    global_completion_slots: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Rollout:
    """This rank's share of one generation batch, with what every step that reuses it needs."""

    index: int  # the generation batch: steps index*num_iterations ... (index+1)*num_iterations - 1
    epoch: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # [completions] float32
    counts: CompletionCounts
    global_tokens: int  # prompt + completion tokens of the whole batch
    metrics: dict[str, float]
    old_logps: list[torch.Tensor] | None = None
    ref_logps: list[torch.Tensor] | None = None

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "counts"} | {
            "counts": [self.counts.global_completions, self.counts.global_completion_tokens,
                       self.counts.global_completion_slots]}

    @classmethod
    def from_states(cls, states: list[dict], rank: int, world_size: int) -> Rollout:
        """The shares of every rank of a saved batch (any world size), re-sliced for `rank` of `world_size`."""
        first = states[0]
        joined = {}
        for name in ("prompt_ids", "completion_ids", "old_logps", "ref_logps"):
            joined[name] = None if first[name] is None else [x for s in states for x in s[name]]
        advantages = torch.cat([s["advantages"] for s in states])
        n = advantages.numel() // world_size
        part = slice(rank * n, (rank + 1) * n)
        return cls(
            index=first["index"], epoch=first["epoch"], advantages=advantages[part],
            counts=CompletionCounts(*first["counts"]), global_tokens=first["global_tokens"],
            metrics=first["metrics"], **{k: None if v is None else v[part] for k, v in joined.items()},
        )


class RolloutSteps:
    """The loop's step batches for a grpo job (module docstring)."""

    def __init__(
        self,
        strategy,
        loss: GRPOLoss,
        method,
        dataset,
        tokenizer,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool,
        start_step: int,
        attention: str,
        run_dir: Path,
        log_every: int,
        max_steps: int,
        reference: Callable[[nn.Module, object], torch.Tensor] | None = None,
        resume_from: Path | None = None,
        gather: str = "forward",
        merge_lora: bool = False,
        on_logged: Callable[[list[dict], int], None] | None = None,
    ):
        self.strategy, self.env, self.loss, self.method = strategy, strategy.env, loss, method
        self.dataset, self.tokenizer = dataset, tokenizer
        self.prompt_lengths = np.asarray(dataset.with_format("arrow")["length"]).astype(np.int64)
        self.group = method.num_generations
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.prompts_per_step = global_batch_size // self.group
        self.per_rank = global_batch_size // self.env.world_size
        self.seed, self.shuffle, self.attention = seed, shuffle, attention
        self.settings = SamplingSettings.from_method(method)
        self.reference, self.run_dir, self.gather = reference, Path(run_dir), gather
        self.merge_lora = merge_lora
        self.on_logged = on_logged  # rank 0: the logged completions of a step, also to W&B as a table
        self.log_every, self.max_steps = log_every, max_steps
        self.scorer = RewardScorer(
            method.rewards, dtype=strategy.options.compute_dtype, device=self.env.device
        )
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = tokenizer.eos_token_id
        self.step = start_step  # 0-based index of the next step to hand out
        self.rollout: Rollout | None = None
        self._logged_rows = 0
        if self.env.is_main:
            self._logged_rows = truncate_completions(self.run_dir / COMPLETIONS_FILE, start_step)
        if resume_from is not None and start_step % loss.num_iterations:
            self.rollout = self.restore(resume_from)

    # -- the loop's iterator ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        step, index = self.step, self.step // self.loss.num_iterations
        fresh = self.rollout is None or self.rollout.index != index
        if fresh:
            self.rollout = self.generate(index)
        r = self.rollout
        micro_batches = completion_micro_batches(
            r.prompt_ids, r.completion_ids, r.advantages, self.micro_batch_size,
            old_logps=r.old_logps, ref_logps=r.ref_logps, attention=self.attention,
        )
        metrics = dict(r.metrics)
        if not fresh:  # reused: nothing was generated or scored for this step
            metrics.update({"time/generate_s": 0.0, "time/score_s": 0.0, "tokens/generated_per_s": 0.0})
        self.step += 1
        return RolloutBatch(
            micro_batches=micro_batches,
            global_label_tokens=r.counts.global_completion_tokens,
            global_tokens=r.global_tokens,
            global_samples=r.counts.global_completions,
            epoch=r.epoch,
            step=step,
            global_rows=r.counts.global_completions,
            global_completions=r.counts.global_completions,
            global_completion_tokens=r.counts.global_completion_tokens,
            global_completion_slots=r.counts.global_completion_slots,
            metrics=metrics,
        )

    # -- one generation batch ---------------------------------------------------------------------
    def generate(self, index: int) -> Rollout:
        env, group = self.env, self.group
        epoch, rows = step_prompts(len(self.dataset), self.prompts_per_step, self.seed, self.shuffle, index)
        mine = slice(env.rank * self.per_rank, (env.rank + 1) * self.per_rank)  # of the prompt-major completions
        slot_rows = [int(rows[c // group]) for c in range(len(rows) * group)][mine]
        keys = group_keys(self.seed, index, [int(p) for p in rows], group)[mine]
        samples = {row: read_prompt(self.dataset[row]) for row in sorted(set(slot_rows))}
        prompt_ids = [samples[row].input_ids for row in slot_rows]

        started = time.perf_counter()
        if self.gather == "rollout":  # the plan found room: one gather for every forward of the rollout
            gather = self.strategy.gathered()
        else:
            gather = contextlib.nullcontext(self.strategy.collective_forward)
        with gather as collective, self._merged(collective), self.strategy.forward_context():
            out = generate(self.strategy.unwrap(), prompt_ids, keys, self.settings, self.pad, self.eos,
                           all_done=all_ranks_done(self.strategy) if collective else None, inference=not collective)
        generated_s = time.perf_counter() - started

        started = time.perf_counter()
        texts = self.tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
        prompts = [samples[row].prompt for row in slot_rows]
        totals, per_reward = self.scorer.score(
            prompts, texts, columns_of([samples[row] for row in slot_rows]), index * self.loss.num_iterations + 1,
            completion_ids=out.token_ids,
        )
        scored_s = time.perf_counter() - started

        # Every rank's rewards, lengths and cut flags, laid out globally: a sum where others add zeros.
        names = list(per_reward)
        local = torch.stack(
            [totals, torch.tensor([len(c) for c in out.token_ids], dtype=torch.float32),
             torch.tensor(out.truncated, dtype=torch.float32), *[per_reward[n] for n in names]], dim=1
        ).double()
        table = torch.zeros(self.global_batch_size, local.shape[1], dtype=torch.float64)
        table[mine] = local
        table = self._sum(table)
        rewards, lengths, cut = table[:, 0], table[:, 1], table[:, 2]
        advantages = group_advantages(rewards, group, self.method.scale_rewards)
        counts = CompletionCounts.of([int(n) for n in lengths.tolist()], self.settings.max_completion_length)
        prompt_tokens = int(self.prompt_lengths[rows].sum()) * group
        generated = int(lengths.sum())
        metrics = {
            "reward": nanmean(rewards),
            "reward_std": nanstd(rewards),
            **{f"rewards/{n}/mean": nanmean(table[:, 3 + i]) for i, n in enumerate(names)},
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(cut.mean()),
            "frac_reward_zero_std": float(advantages.all_equal_share),
            "time/generate_s": generated_s,
            "time/score_s": scored_s,
            "tokens/generated_per_s": out.num_tokens * env.world_size / max(generated_s, 1e-9),
        }
        rollout = Rollout(
            index=index, epoch=epoch, prompt_ids=prompt_ids, completion_ids=out.token_ids,
            advantages=advantages.values[mine].float(), counts=counts,
            global_tokens=prompt_tokens + generated, metrics=metrics,
        )
        self._log_completions(rollout, prompts, texts, table[mine], names)
        self._token_logps(rollout)
        return rollout

    def _merged(self, collective: bool):
        """LoRA merged into its base for the rollout where the plan found room and the parameters are whole
        on this rank (not sharded, or gathered for the rollout)."""
        if not self.merge_lora or collective:
            return contextlib.nullcontext()
        from training.rollout.merged_lora import merged_lora

        return merged_lora(self.strategy.unwrap())

    def _token_logps(self, r: Rollout) -> None:
        """The old policy's (num_iterations > 1) and the reference's (beta > 0) log-probabilities of each
        completion token, computed once for the generation batch, micro-batch by micro-batch."""
        need_old, need_ref = self.loss.num_iterations > 1, self.loss.beta > 0
        if not (need_old or need_ref):
            return
        empty = torch.zeros(len(r.completion_ids))
        micro_batches = completion_micro_batches(r.prompt_ids, r.completion_ids, empty, self.micro_batch_size,
                                                 attention=self.attention)
        olds, refs = [], []
        for k, micro in enumerate(micro_batches):
            part = r.completion_ids[k * self.micro_batch_size : (k + 1) * self.micro_batch_size]
            lengths = [len(c) for c in part]
            if need_old:
                olds += list(run_forward(self.strategy, self.loss.token_logps, micro).cpu().split(lengths))
            if need_ref:
                refs += list(run_forward(self.strategy, self.reference, micro).float().cpu().split(lengths))
        r.old_logps = olds if need_old else None
        r.ref_logps = refs if need_ref else None

    # -- agreement across ranks -------------------------------------------------------------------
    def _sum(self, table: torch.Tensor) -> torch.Tensor:
        if self.env.world_size == 1:
            return table
        return self.strategy.all_reduce_sum(table.to(self.env.device)).cpu()

    # -- RUN/completions.jsonl --------------------------------------------------------------------
    def _log_completions(self, r: Rollout, prompts, texts, values: torch.Tensor, names: list[str]) -> None:
        """Prompts, completions, rewards and advantages of logged steps (the first LOGGED_PER_STEP of each),
        written by rank 0; the other ranks send theirs."""
        first = r.index * self.loss.num_iterations + 1  # the steps this generation batch trains
        steps = range(first, min(first + self.loss.num_iterations, self.max_steps + 1))
        if not any(s % self.log_every == 0 or s == self.max_steps for s in steps):
            return
        step = first
        keep = max(0, min(self.per_rank, LOGGED_PER_STEP - self.env.rank * self.per_rank))
        rows = [
            {"step": step, "prompt": prompts[i], "completion": texts[i],
             "reward": none_if_nan(float(values[i, 0])),
             "rewards": {n: none_if_nan(float(values[i, 3 + k])) for k, n in enumerate(names)},
             "advantage": float(r.advantages[i]), "tokens": len(r.completion_ids[i]),
             "truncated": bool(values[i, 2])}
            for i in range(keep)
        ]
        if self.env.world_size > 1 and LOGGED_PER_STEP > self.per_rank:
            import torch.distributed as dist

            gathered: list = [None] * self.env.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not self.env.is_main:
            return
        if self.on_logged is not None:
            self.on_logged(rows, step)
        if self._logged_rows >= LOGGED_AT_MOST:
            return
        rows = rows[: LOGGED_AT_MOST - self._logged_rows]
        with (self.run_dir / COMPLETIONS_FILE).open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        self._logged_rows += len(rows)

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self, checkpoint_dir: Path) -> None:
        """Keep this rank's share of the generation batch in a checkpoint that lands inside it (a resume
        there continues the same batch). Every rank calls it; nothing is written at batch boundaries."""
        if self.rollout is None or self.step % self.loss.num_iterations == 0:
            return
        state = {**self.rollout.state(), "rank": self.env.rank, "world_size": self.env.world_size}
        torch.save(state, Path(checkpoint_dir) / ROLLOUT_FILE.format(rank=self.env.rank))

    def restore(self, checkpoint_dir: Path) -> Rollout:
        paths = sorted(Path(checkpoint_dir).glob(ROLLOUT_FILE.format(rank="*")),
                       key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
        if not paths:
            raise RuntimeError(
                f"{checkpoint_dir} was written inside a generation batch (method.num_iterations "
                f"{self.loss.num_iterations}) but holds no {ROLLOUT_FILE.format(rank='N')}: resume from an "
                "earlier checkpoint"
            )
        states = [torch.load(p, weights_only=False) for p in paths]
        if len(states) != states[0]["world_size"]:
            raise RuntimeError(f"{checkpoint_dir}: {len(states)} rollout shares of {states[0]['world_size']} ranks")
        return Rollout.from_states(states, self.env.rank, self.env.world_size)


def columns_of(samples: list[PromptSample]) -> dict[str, list]:
    """The data columns per completion, as reward functions get them (a column a record lacks: None)."""
    names: dict[str, None] = {}
    for sample in samples:
        names.update(dict.fromkeys(sample.columns))
    return {name: [s.columns.get(name) for s in samples] for name in names}


def nanmean(values: torch.Tensor) -> float | None:
    value = float(torch.nanmean(values.double()))
    return None if math.isnan(value) else value


def nanstd(values: torch.Tensor) -> float | None:
    from training.methods.grpo_advantages import nanstd as unbiased

    value = float(unbiased(values.double()))
    return None if math.isnan(value) else value


def none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def truncate_completions(path: Path, step: int) -> int:
    """Drop rows of steps after `step` (a resumed run writes them again); returns the rows kept."""
    if not path.is_file():
        return 0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(kept)
