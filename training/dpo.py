"""Direct preference optimisation: the policy's log-ratio of chosen over rejected, against a reference model.

A micro-batch is one padding-free row chosen₁ rejected₁ chosen₂ rejected₂ … (each pair is one stored
row, training/data.py): one forward gives every sequence's summed log-probability of its answer tokens.
The reference model's log-probabilities come from one of two places, never from a second copy:

- adapter disabled (LoRA/QLoRA, reference: auto): the same model under peft's disable_adapter(), a
  no-grad forward of the same micro-batch in the same step. No extra memory; one more forward without
  backward per micro-batch (about a third more compute).
- precomputed (full fine-tuning, or reference: precompute): before step 1 the initial model, placed by
  the job's own strategy, computes each pair's log-probabilities once; they are kept in RUN/reference/
  keyed by dataset row, and a resumed run reads them back. No memory and no per-step cost, and no
  strategy needs to place a second, frozen model (which a full reference would need under FSDP/ZeRO-3).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.attention import collate_attention
from training.methods import IGNORE_INDEX, LossOutput, label_columns, takes_logits_to_keep

log = logging.getLogger("sharpen")

REFERENCE_FILE = Path("reference") / "logps.pt"


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[T] index of the sequence each token of a padding-free [1, T] row belongs to (positions restart at 0)."""
    if position_ids.shape[0] != 1:
        raise ValueError(
            f"preference micro-batches are one padding-free row, got {position_ids.shape[0]} rows"
        )
    return torch.cumsum((position_ids[0] == 0).long(), 0) - 1


def sequence_logps(model: nn.Module, batch, slice_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) per sequence, label tokens per sequence), each [num_sequences] in fp64.

    With `slice_logits` the output projection runs on label positions only, as CausalLMLoss does."""
    labels, sequences, keep = batch.labels[0], sequence_index(batch.position_ids), {}
    if slice_logits:
        columns = label_columns(batch)  # one row: its label positions
        labels, sequences, keep = labels[columns], sequences[columns], {"logits_to_keep": columns}
    out = model(**batch.model_inputs(), **keep)
    logits = out.logits[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits up to fp32, never down
    token_logps = -F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").double()
    valid = (labels != IGNORE_INDEX).double()
    zeros = torch.zeros(batch.num_samples, dtype=torch.float64, device=logits.device)  # sums of many terms
    return zeros.index_add(0, sequences, token_logps * valid), zeros.index_add(0, sequences, valid)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from log-probabilities, as TRL defines them.

    sigmoid: -log σ(β·h), conservative with label smoothing ε: -(1-ε)·log σ(β·h) - ε·log σ(-β·h);
    ipo: (h - 1/(2β))², on log-probabilities averaged per token (the caller divides); hinge: max(0, 1 - β·h);
    where h = (chosen - rejected) - (ref_chosen - ref_rejected). Rewards are β·(policy - reference)."""
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


class AdapterDisabledReference:
    """LoRA/QLoRA: the reference is the model itself with its adapter (and modules_to_save) switched off."""

    def __init__(self, model: nn.Module):
        from peft import PeftModel

        found = [m for m in model.modules() if isinstance(m, PeftModel)]
        if not found:
            raise ValueError("reference: the adapter-disabled reference needs a PEFT (LoRA/QLoRA) model")
        self.peft_model = found[0]
        self.slices: dict[int, bool] = {}

    def logps(self, model: nn.Module, batch) -> torch.Tensor:
        if id(model) not in self.slices:
            self.slices[id(model)] = takes_logits_to_keep(model)
        with torch.no_grad(), self.peft_model.disable_adapter():
            return sequence_logps(model, batch, self.slices[id(model)])[0]


class PrecomputedReference:
    """Reference log-probabilities computed before training: a [rows, 2] (chosen, rejected) table."""

    def __init__(self, table: torch.Tensor):
        self.table = table.cpu()
        self.known = ~np.isnan(self.table.numpy()).any(axis=1)  # rows the table has, checked on the host

    def logps(self, model: nn.Module, batch) -> torch.Tensor:
        if batch.row_ids is None:
            raise ValueError(
                "precomputed reference log-probabilities need micro-batches that name their rows"
            )
        missing = [r for r in batch.row_ids if not self.known[r]]
        if missing:
            raise RuntimeError(
                f"no precomputed reference log-probabilities for rows {missing[:5]}: the run reads rows its "
                "first start did not plan for (was train.max_steps raised on resume?)"
            )
        values = self.table[torch.as_tensor(batch.row_ids)].flatten()  # chosen₁ rejected₁ chosen₂ …
        device = batch.input_ids.device
        if device.type == "cuda":  # page-locked: an asynchronous copy the host does not wait for
            values = values.pin_memory()
        return values.to(device, non_blocking=True)


class DPOLoss:
    """DPO over a micro-batch of pairs: a sum over pairs, divided by the step's pairs (`global_rows`)."""

    normaliser = "global_rows"

    def __init__(self, reference, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0):
        self.reference, self.beta, self.loss, self.label_smoothing = reference, beta, loss, label_smoothing
        self._slices: dict[int, bool] = {}

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        if id(model) not in self._slices:
            self._slices[id(model)] = takes_logits_to_keep(model)
        reference = self.reference.logps(model, batch)  # first: its activations are gone before ours are made
        policy, tokens = sequence_logps(model, batch, self._slices[id(model)])
        if self.loss == "ipo":
            policy, reference = policy / tokens, reference / tokens
        losses, chosen, rejected = dpo_losses(
            policy[0::2],
            policy[1::2],
            reference[0::2],
            reference[1::2],
            self.beta,
            self.loss,
            self.label_smoothing,
        )
        margin = chosen - rejected
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/margin": margin.sum(),
            "rewards/accuracy": (margin > 0).float().sum(),
        }
        return LossOutput(losses.sum().float(), metrics)  # fp64 inside, the dtype strategies expect outside


# -------------------------------------------------------------- precomputing the reference


def rows_used(num_rows: int, global_batch_size: int, max_steps: int, seed: int, shuffle: bool) -> np.ndarray:
    """The training rows that steps 1..max_steps read (training/data.py step_batches' order), sorted."""
    from training.sampler import epoch_order

    steps_per_epoch = num_rows // global_batch_size
    if max_steps >= steps_per_epoch:
        return np.arange(num_rows)  # a second epoch reorders: (nearly) every row is read
    return np.sort(epoch_order(num_rows, seed, 0, shuffle)[: max_steps * global_batch_size])


def precompute(strategy, logps_of, train_ds, train_rows, eval_ds, **batching) -> torch.Tensor:
    """[train rows + eval rows, 2] reference log-probabilities (NaN where not needed), on every rank.

    Each rank computes its shard; an all-reduce of the zero-filled table joins them."""
    env, model = strategy.env, strategy.model
    sources = [(train_ds, train_rows, 0)]
    if eval_ds is not None:
        sources.append((eval_ds, range(len(eval_ds)), len(train_ds)))
    size = sum(len(dataset) for dataset, _, _ in sources)
    table = torch.zeros(size, 2, dtype=torch.float64, device=env.device)
    needed = torch.zeros(size, dtype=torch.bool)
    from training.evaluate import shard_micro_batches

    was_training = model.training
    model.eval()
    try:
        for dataset, rows, offset in sources:
            needed[torch.as_tensor(np.asarray(rows, dtype=np.int64) + offset)] = True
            for micro, real in shard_micro_batches(
                dataset, rows, rank=env.rank, world_size=env.world_size, row_offset=offset, **batching
            ):
                micro = micro.to(env.device, dtype=strategy.options.compute_dtype)
                with torch.no_grad(), strategy.forward_context():
                    values = logps_of(model, micro).double().view(-1, 2)
                if real:
                    table[torch.as_tensor(micro.row_ids, device=env.device)] = values
    finally:
        model.train(was_training)
    table = strategy.all_reduce_sum(table).cpu()
    table[~needed] = float("nan")
    return table


def build_reference(strategy, spec, plan, run_dir: Path, train_ds, eval_ds, resumed: bool, pad_token_id: int):
    """The job's reference: adapter disabled (LoRA, auto) or a table precomputed now or by the first run."""
    method, lora = spec.method, spec.finetune.type in ("lora", "qlora")
    if lora and method.reference == "auto":
        return AdapterDisabledReference(strategy.model)
    t = spec.train
    rows = rows_used(len(train_ds), plan.global_batch_size, t.max_steps, t.seed, spec.data.shuffle)
    n_eval = 0 if eval_ds is None else len(eval_ds)
    needed = torch.as_tensor(np.concatenate([rows, len(train_ds) + np.arange(n_eval)]))
    path = Path(run_dir) / REFERENCE_FILE
    key = {"data_cache": plan.data_cache, "job_hash": plan.job_hash}
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        table = stored["table"]
        if {k: stored.get(k) for k in key} == key and len(table) == len(train_ds) + n_eval:
            if not torch.isnan(table[needed]).any():
                log.info("reference log-probabilities read from %s", path)
                return PrecomputedReference(table)
        if resumed:
            raise RuntimeError(
                f"{path} lacks reference log-probabilities this run needs (other data, another job, or rows "
                "a longer train.max_steps reads), and the model is no longer the initial one: start the "
                "run again in a new run directory"
            )
    elif resumed:
        raise RuntimeError(
            f"the run resumes from a checkpoint but {path} is missing: its reference "
            "log-probabilities cannot be computed from a trained model"
        )
    if lora:  # precompute for LoRA: the base model is the reference, as in the per-step case
        logps_of = AdapterDisabledReference(strategy.model).logps
    else:
        slices = takes_logits_to_keep(strategy.model)

        def logps_of(model, batch):
            return sequence_logps(model, batch, slices)[0]

    log.info("precomputing reference log-probabilities of %d training and %d eval pairs", len(rows), n_eval)
    table = precompute(
        strategy,
        logps_of,
        train_ds,
        rows,
        eval_ds,
        micro_batch_size=plan.micro_batch_size,
        attention=collate_attention(spec.model.attention, strategy.env.device),
        pad_token_id=pad_token_id,
    )
    if strategy.env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({**key, "table": table}, tmp)
        os.replace(tmp, path)
    strategy.barrier()
    return PrecomputedReference(table)
