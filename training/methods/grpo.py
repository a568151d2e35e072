"""GRPO's update: the clipped policy-gradient objective over a micro-batch of generated completions.

A micro-batch is one padding-free row prompt₁ completion₁ prompt₂ completion₂ …, labels on the
completion tokens only (`collate_completions`). One forward gives each completion token's
log-probability under the policy, at the sampling temperature (TRL divides the logits by it too), and
the policy's entropy there from the same logits. Per completion token t of completion i:

    ratio = exp(logp - old_logp)                 old_logp = logp.detach() when on-policy: ratio 1
    loss  = -min(ratio · A_i, clip(ratio, 1 - ε, 1 + ε_high) · A_i) + β · k3
    k3    = exp(ref - logp) - (ref - logp) - 1   (β > 0 only)

The loss is a sum over the micro-batch; the loop divides by one global count of the whole step
(`normaliser`), so the step's loss is the same whatever the micro-batches, accumulation and ranks:

    dapo     Σ tokens                         / the step's completion tokens   global_completion_tokens
    grpo     Σ completions (Σ tokens / length) / the step's completions         global_completions
    dr_grpo  Σ tokens                         / completions × max length       global_completion_slots

TRL (grpo_trainer.py `_compute_loss`) has the same three formulas, but grpo and dr_grpo divide per
micro-batch and then by the accumulation steps and the processes: the step's mean only when every
micro-batch holds as many completions. Here the division is by the step's count, always exact. TRL's
dapo divides by the global completion tokens of the generation batch: the same as here when one
generation batch feeds one optimizer step (TRL's default, steps_per_generation = accumulation steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from launcher.method_spec import GRPO_LOSSES
from training.data.packing import MicroBatch, collate
from training.methods.base import IGNORE_INDEX, LossOutput, PerModel, label_columns, takes_logits_to_keep
from training.methods.dpo import sequence_index

# The global count of the step each loss type is divided by: the step batch the loop reads carries them.
NORMALISERS = {
    "dapo": "global_completion_tokens",
    "grpo": "global_completions",
    "dr_grpo": "global_completion_slots",
}
# The metrics are means over the step's completion tokens, whatever the loss type divides by.
METRIC_NORMALISER = "global_completion_tokens"


@dataclass(frozen=True)
class CompletionCounts:
    """A step's global counts, over every rank's completions: what `GRPOLoss.normaliser` names."""

    global_completions: int
    global_completion_tokens: int
    global_completion_slots: int  # completions x max_completion_length: Dr. GRPO's constant length

    @classmethod
    def of(cls, completion_lengths: Sequence[int], max_completion_length: int) -> CompletionCounts:
        """The counts of a step whose completions (all of them, every rank's) have these lengths."""
        n = len(completion_lengths)
        return cls(n, int(sum(completion_lengths)), n * max_completion_length)


@dataclass
class GRPOMicroBatch(MicroBatch):
    """A MicroBatch of completions with what the loss needs beyond tokens. Per-token tensors hold one
    value per completion token, in the order of the label positions of the row (completion by completion)."""

    advantages: torch.Tensor | None = None  # [completions in this micro-batch]
    old_logps: torch.Tensor | None = None  # [completion tokens]; None: on-policy (num_iterations 1)
    ref_logps: torch.Tensor | None = None  # [completion tokens]; None: no reference (beta 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        extra = {name: getattr(self, name) for name in ("advantages", "old_logps", "ref_logps")}
        return {**super().tensors(), **{k: v for k, v in extra.items() if v is not None}}


def completion_row(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> dict:
    """One stored-row dict of prompt + completion with shifted labels on the completion tokens only."""
    if not prompt_ids:
        raise ValueError(
            "a completion needs a prompt of at least one token (its first token is predicted from it)"
        )
    ids = [*prompt_ids, *completion_ids]
    labels = [IGNORE_INDEX] * (len(prompt_ids) - 1) + list(completion_ids) + [IGNORE_INDEX]
    return {"input_ids": ids, "labels": labels, "segment_lengths": [len(ids)]}


def collate_completions(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    advantages: torch.Tensor,
    *,
    old_logps: Sequence[torch.Tensor] | None = None,
    ref_logps: Sequence[torch.Tensor] | None = None,
    attention: str = "sdpa",
) -> GRPOMicroBatch:
    """Completions (each with its prompt) → one padding-free GRPOMicroBatch; `old_logps` / `ref_logps`
    are per completion ([its tokens] each), joined here in label order."""
    if not len(prompt_ids) == len(completion_ids) == advantages.numel():
        raise ValueError(
            f"{len(prompt_ids)} prompts, {len(completion_ids)} completions and {advantages.numel()} advantages"
        )
    rows = [completion_row(p, c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    micro = collate(rows, padding_free=True, attention=attention)
    per_token = {}
    for name, values in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if values is None:
            continue
        lengths = [len(c) for c in completion_ids]
        if [v.numel() for v in values] != lengths:
            raise ValueError(
                f"{name}: {[v.numel() for v in values]} values for completions of {lengths} tokens"
            )
        per_token[name] = torch.cat([v.reshape(-1).float() for v in values])
    fields = {name: getattr(micro, name) for name in MicroBatch.__dataclass_fields__}
    return GRPOMicroBatch(**fields, advantages=advantages.reshape(-1).float(), **per_token)


def completion_micro_batches(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    advantages: torch.Tensor,
    micro_batch_size: int,
    *,
    old_logps: Sequence[torch.Tensor] | None = None,
    ref_logps: Sequence[torch.Tensor] | None = None,
    attention: str = "sdpa",
) -> list[GRPOMicroBatch]:
    """A rank's completions in micro-batches of `micro_batch_size` completions, in order."""
    out = []
    for start in range(0, len(completion_ids), micro_batch_size):
        part = slice(start, start + micro_batch_size)
        out.append(
            collate_completions(
                prompt_ids[part],
                completion_ids[part],
                advantages[part],
                old_logps=None if old_logps is None else old_logps[part],
                ref_logps=None if ref_logps is None else ref_logps[part],
                attention=attention,
            )
        )
    return out


@dataclass
class TokenLogps:
    """Per completion token of a micro-batch, in label order."""

    logps: torch.Tensor  # [tokens] fp32 (or wider), log p(token) at the sampling temperature
    sequences: torch.Tensor  # [tokens] the completion (0..completions-1) each token belongs to
    entropy: torch.Tensor | None  # [tokens] the policy's entropy at each, no gradient; None unless asked


def completion_logps(
    model: nn.Module, batch: MicroBatch, slice_logits: bool, temperature: float = 1.0, entropy: bool = False
) -> TokenLogps:
    """Log-probabilities of the label tokens of a padding-free row from one forward, logits / temperature.

    With `slice_logits` the output projection runs on label positions only (`logits_to_keep`)."""
    columns = label_columns(batch)  # one row: its label positions, found on the host by the collator
    labels = batch.labels[0, columns]
    sequences = sequence_index(batch.position_ids)[columns]
    keep = {"logits_to_keep": columns} if slice_logits else {}
    logits = model(**batch.model_inputs(), **keep).logits[0]
    if not slice_logits:
        logits = logits[columns]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32, never down
    logps = F.log_softmax(logits / temperature, dim=-1)
    token_logps = logps.gather(-1, labels[:, None])[:, 0]
    entropies = None
    if entropy:
        with torch.no_grad():
            entropies = -(logps.exp() * logps).sum(-1)
    return TokenLogps(token_logps, sequences, entropies)


class GRPOLoss:
    """GRPO, Dr. GRPO and DAPO's clipped objective over a micro-batch of completions (module docstring).

    `normaliser` names the step's global count the loss sum is divided by (a `CompletionCounts` field);
    the metrics (token sums: clip ratios, entropy, KL) are divided by `metric_normaliser`, the step's
    completion tokens, so they are token means under every loss type."""

    metric_normaliser = METRIC_NORMALISER

    def __init__(
        self,
        loss: str = "dapo",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        temperature: float = 1.0,
        num_iterations: int = 1,
    ):
        if loss not in GRPO_LOSSES:
            raise ValueError(f"GRPO loss must be one of {GRPO_LOSSES}, not {loss!r}")
        self.loss, self.normaliser = loss, NORMALISERS[loss]
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta, self.temperature, self.num_iterations = beta, temperature, num_iterations
        self._slices = PerModel(takes_logits_to_keep)

    def token_logps(self, model: nn.Module, batch: MicroBatch) -> torch.Tensor:
        """[completion tokens] log-probabilities without gradient: the old policy's (num_iterations > 1,
        before the first update) or the reference's (the adapter disabled, or the frozen reference model)."""
        with torch.no_grad():
            return completion_logps(model, batch, self._slices(model), self.temperature).logps.float()

    def __call__(self, model: nn.Module, batch: GRPOMicroBatch) -> LossOutput:
        if batch.advantages is None:
            raise ValueError("a GRPO micro-batch needs its completions' advantages")
        if self.beta > 0 and batch.ref_logps is None:
            raise ValueError("beta > 0: the micro-batch needs the reference's log-probabilities (ref_logps)")
        if self.num_iterations > 1 and batch.old_logps is None:
            raise ValueError(
                "num_iterations > 1: the micro-batch needs the generating policy's log-probabilities (old_logps)"
            )
        policy = completion_logps(model, batch, self._slices(model), self.temperature, entropy=True)
        logps, sequences = policy.logps, policy.sequences
        old = logps.detach() if batch.old_logps is None else batch.old_logps.to(logps.dtype)
        advantages = batch.advantages.to(logps.dtype)[sequences]
        ratio = torch.exp(logps - old)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        metrics = {}
        if self.beta > 0:
            delta = batch.ref_logps.to(logps.dtype) - logps
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.beta * kl
            metrics["kl"] = kl.detach().double().sum()
        loss_sum = self._reduce(per_token.double(), sequences, batch.num_samples)
        with torch.no_grad():
            low = (ratio < 1 - self.epsilon_low) & (advantages < 0)  # where the clipped term is the minimum
            high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low"] = low.double().sum()
            metrics["clip_ratio/high"] = high.double().sum()
            metrics["clip_ratio/region"] = (low | high).double().sum()
            metrics["entropy"] = policy.entropy.double().sum()
        return LossOutput(loss_sum.float(), metrics)  # fp64 sums inside, the dtype strategies expect outside

    def _reduce(self, per_token: torch.Tensor, sequences: torch.Tensor, completions: int) -> torch.Tensor:
        """The micro-batch's share of the step's loss before the division by the global count."""
        if self.loss != "grpo":  # dapo, dr_grpo: every token alike
            return per_token.sum()
        zeros = torch.zeros(completions, dtype=per_token.dtype, device=per_token.device)
        sums = zeros.index_add(0, sequences, per_token)
        lengths = zeros.index_add(0, sequences, torch.ones_like(per_token))
        return (sums / lengths.clamp(min=1)).sum()
