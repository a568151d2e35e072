"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired feedback: each row one prompt +
completion and whether the completion is desirable (thumbs up) or not.

The loss is TRL 1.16's KTOTrainer with loss_type "kto" (`_compute_loss`), per completion:

    logr = policy − reference summed log-probabilities of the completion   (chosen_/rejected_logratios)
    z0   = max(0, mean over the KL pairs of policy − reference log-probs), detached   (TRL's `kl`)
    desirable:   desirable_weight   · (1 − σ(β·(logr − z0)))
    undesirable: undesirable_weight · (1 − σ(β·(z0 − logr)))

summed and divided by the step's examples (`global_rows`), as TRL averages the weighted losses over
the batch's examples. The KL pairs are mismatched (prompt, completion) pairs: example i's prompt with
example (i+1) mod N's completion (training/methods/kto_pairs.py), as TRL cycles completions by one.

Where sharpen differs from TRL: TRL pairs and estimates z0 per device micro-batch (its KL completions
are the per-device batch shifted by one, and it averages the devices' means), so its z0 changes with
the number of devices and the accumulation. Here z0 belongs to the optimizer step: the pairs are made
in the step's global order (StepBatch.rows, the same on any number of ranks) and, before the step's
first loss forward, one no-grad pass over them (`prepare_step`: this rank's share, summed and
all-reduced) gives z0 for every micro-batch of the step. The same job thus has the same losses on one
rank or eight and with any accumulation. Evaluation does the same over the whole evaluation set.

The reference is that of DPO (training/methods/dpo_reference.py): the adapter switched off (LoRA,
reference: auto), costing a no-grad forward of each micro-batch and of each KL micro-batch; or, for full
fine-tuning, precomputed before step 1 into RUN/reference/: each row's completion, plus the summed
reference log-probabilities of every step's KL pairs and of the evaluation set's. The policy's side of
z0 always takes one no-grad forward of the step's KL pairs.

Metrics, as TRL names them: rewards/chosen and rewards/rejected (β·logr, the mean over the step's
desirable and undesirable completions), rewards/margin (their difference), logps/chosen and
logps/rejected, kl (z0), and loss/desirable + loss/undesirable (= loss). TRL's KTO has no accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.data.packing import DESIRABLE
from training.methods.base import LossOutput, PerModel, takes_logits_to_keep
from training.methods.dpo import sequence_logps
from training.methods.kto_pairs import kl_micro_batches, kl_sum

# PrecomputedReference.sums: each step's KL pairs (index: the step's global index) and the eval set's.
STEP_SUMS, EVAL_SUM = "kl_steps", "kl_eval"


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion (weighted loss, reward β·logr) from summed log-probabilities and the reference point z0."""
    logratios = policy - reference
    z0 = torch.as_tensor(z0, dtype=logratios.dtype, device=logratios.device).detach()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )
    return losses, beta * logratios.detach()


class KTOLoss:
    """KTO over a micro-batch of feedback rows: a sum over completions, divided by the step's (`global_rows`).

    `desirable[row]` is each row's label, training rows then evaluation rows (the rows' ids). z0 and the
    per-label scales of the metrics are set for a whole step by `prepare_step` (the loop calls it first)
    and for an evaluation by `prepare_evaluation`."""

    normaliser = "global_rows"

    def __init__(
        self,
        reference,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        *,
        desirable: np.ndarray,
        train_ds=None,
        max_length: int = 1 << 30,
        micro_batch_size: int = 1,
        attention: str = "sdpa",
        pad_token_id: int = 0,
    ):
        self.reference, self.beta = reference, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.desirable = np.asarray(desirable, dtype=bool)
        self.train_ds, self.max_length, self.micro_batch_size = train_ds, max_length, micro_batch_size
        self.attention, self.pad_token_id = attention, pad_token_id
        self._slices = PerModel(takes_logits_to_keep)
        self.z0: torch.Tensor | float = 0.0
        self._scales = (1.0, 1.0)  # global rows / desirable rows, / undesirable rows: metrics as means per label

    # ---------------------------------------------------------------- the reference point

    def _pair_logratios(self, model: nn.Module, batch) -> torch.Tensor:
        """Policy − reference log-probabilities of KL pairs (policy alone when the reference is precomputed)."""
        policy = sequence_logps(model, batch, self._slices(model))[0]
        if getattr(self.reference, "sums", None) is not None:  # precomputed: its sums are subtracted by the caller
            return policy
        return policy - self.reference.logps(model, batch)

    def _set_point(self, strategy, dataset, rows, reference_sum, micro_batch_size: int) -> None:
        pairs = kl_micro_batches(
            dataset, rows, rank=strategy.env.rank, world_size=strategy.env.world_size,
            micro_batch_size=micro_batch_size, max_length=self.max_length, attention=self.attention,
            pad_token_id=self.pad_token_id,
        )
        total = kl_sum(strategy, pairs, self._pair_logratios)
        if reference_sum is not None:
            total = total - reference_sum.to(total.device, total.dtype)
        self.z0 = (total / len(rows)).clamp(min=0)

    def _set_scales(self, desirable: np.ndarray) -> None:
        n, good = len(desirable), int(desirable.sum())
        self._scales = (n / good if good else 0.0, n / (n - good) if n - good else 0.0)

    def _reference_sum(self, name: str, index: int) -> torch.Tensor | None:
        sums = getattr(self.reference, "sums", None)
        if sums is None:
            return None
        if name not in sums or index >= len(sums[name]) or torch.isnan(sums[name][index]):
            raise RuntimeError(
                f"no precomputed reference log-probabilities of the KL pairs of {name} {index}: the run reads "
                "steps its first start did not plan for (was train.max_steps raised on resume?)"
            )
        return sums[name][index]

    def prepare_step(self, strategy, step_batch) -> None:
        """z0 of the whole step (every rank's KL pairs), before any of its micro-batches."""
        rows = step_batch.rows
        self._set_scales(self.desirable[rows])
        self._set_point(
            strategy, self.train_ds, rows, self._reference_sum(STEP_SUMS, step_batch.step), self.micro_batch_size
        )

    def prepare_evaluation(self, strategy, dataset, *, micro_batch_size: int, row_offset: int = 0, **_) -> None:
        """z0 of the whole evaluation set (its rows paired in order), before its micro-batches."""
        rows = np.arange(len(dataset))
        self._set_scales(self.desirable[rows + row_offset])
        self._set_point(strategy, dataset, rows, self._reference_sum(EVAL_SUM, 0), micro_batch_size)

    # ---------------------------------------------------------------- the loss

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        if batch.row_ids is None:
            raise ValueError("KTO micro-batches need the rows they hold (their labels are kept per row)")
        reference = self.reference.logps(model, batch)  # first: its activations are gone before ours are made
        policy = sequence_logps(model, batch, self._slices(model))[0]
        desirable = torch.as_tensor(self.desirable[batch.row_ids]).to(policy.device, non_blocking=True)
        losses, rewards = kto_losses(
            policy, reference, desirable, self.z0, self.beta, self.desirable_weight, self.undesirable_weight
        )
        good, bad = desirable.double(), (~desirable).double()
        to_chosen, to_rejected = self._scales
        chosen, rejected = (rewards * good).sum() * to_chosen, (rewards * bad).sum() * to_rejected
        logps = policy.detach()
        metrics = {
            "loss/desirable": (losses * good).sum().detach(),
            "loss/undesirable": (losses * bad).sum().detach(),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "logps/chosen": (logps * good).sum() * to_chosen,
            "logps/rejected": (logps * bad).sum() * to_rejected,
            "kl": torch.as_tensor(self.z0, dtype=torch.float64, device=policy.device) * len(batch.row_ids),
        }
        return LossOutput(losses.sum().float(), metrics)  # fp64 inside, the dtype strategies expect outside


def build_kto_loss(strategy, spec, plan, run_dir, train_ds, eval_ds, resumed: bool, pad_token_id: int) -> KTOLoss:
    """The job's KTO loss with its reference (adapter disabled, or precomputed now or by the first run)."""
    from training.data.sampler import step_prompts
    from training.kernels.attention import collate_attention
    from training.methods import create_method
    from training.methods.dpo_reference import build_reference

    method, t, env = spec.method, spec.train, strategy.env
    attention = collate_attention(spec.model.attention, env.device)
    batching = {"rank": env.rank, "world_size": env.world_size, "micro_batch_size": plan.micro_batch_size,
                "max_length": spec.data.max_length, "attention": attention, "pad_token_id": pad_token_id}

    def step_sums(logps_of) -> torch.Tensor:  # the reference's Σ over each step's KL pairs, step by step
        sums = torch.zeros(t.max_steps, dtype=torch.float64)
        for step in range(t.max_steps):
            _, rows = step_prompts(len(train_ds), plan.global_batch_size, t.seed, spec.data.shuffle, step)
            sums[step] = kl_sum(strategy, kl_micro_batches(train_ds, rows, **batching), logps_of).cpu()
        return sums

    def eval_sum(logps_of) -> torch.Tensor:
        if eval_ds is None:
            return torch.zeros(0, dtype=torch.float64)
        rows = np.arange(len(eval_ds))
        return kl_sum(strategy, kl_micro_batches(eval_ds, rows, **batching), logps_of).cpu().view(1)

    sums = {STEP_SUMS: (t.max_steps, step_sums), EVAL_SUM: (0 if eval_ds is None else 1, eval_sum)}
    reference = build_reference(
        strategy, spec, plan, run_dir, train_ds, eval_ds, resumed, pad_token_id, sequences_per_row=1, sums=sums
    )
    labels = [np.asarray(train_ds[DESIRABLE], dtype=bool)]
    if eval_ds is not None:
        labels.append(np.asarray(eval_ds[DESIRABLE], dtype=bool))
    return create_method(
        "kto", method, reference, desirable=np.concatenate(labels), train_ds=train_ds, max_length=spec.data.max_length,
        micro_batch_size=plan.micro_batch_size, attention=attention, pad_token_id=pad_token_id,
    )
