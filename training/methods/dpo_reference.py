"""DPO's and KTO's reference log-probabilities: the adapter-disabled model, or a table precomputed before step 1.

The table has a column per sequence of a stored row (DPO: chosen, rejected; KTO: its one completion),
keyed by dataset row; beside it, `sums` a method needs that are not per row (KTO: each step's KL pairs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import heartbeat
from training.forward import run_forward
from training.kernels.attention import collate_attention
from training.methods.base import PerModel, takes_logits_to_keep
from training.methods.dpo import sequence_logps

log = logging.getLogger("sharpen")

REFERENCE_FILE = Path("reference") / "logps.pt"


class AdapterDisabledReference:
    """LoRA/QLoRA: the reference is the model itself with its adapter (and modules_to_save) switched off."""

    def __init__(self, model: nn.Module):
        from peft import PeftModel

        found = [m for m in model.modules() if isinstance(m, PeftModel)]
        if not found:
            raise ValueError("reference: the adapter-disabled reference needs a PEFT (LoRA/QLoRA) model")
        self.peft_model = found[0]
        self.slices = PerModel(takes_logits_to_keep)

    def logps(self, model: nn.Module, batch) -> torch.Tensor:
        with torch.no_grad(), self.peft_model.disable_adapter():
            return sequence_logps(model, batch, self.slices(model))[0]


class PrecomputedReference:
    """Reference log-probabilities computed before training: a [rows, sequences per row] table (DPO: chosen,
    rejected), and the method's per-run `sums` by name (KTO: each step's KL pairs, training/methods/kto.py)."""

    def __init__(self, table: torch.Tensor, sums: dict[str, torch.Tensor] | None = None):
        self.table = table.cpu()
        self.sums = {name: values.cpu() for name, values in (sums or {}).items()}
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


def rows_used(num_rows: int, global_batch_size: int, max_steps: int, seed: int, shuffle: bool) -> np.ndarray:
    """The training rows that steps 1..max_steps read (training/data/ step_batches' order), sorted."""
    from training.data.sampler import epoch_order

    steps_per_epoch = num_rows // global_batch_size
    if max_steps >= steps_per_epoch:
        return np.arange(num_rows)  # a second epoch reorders: (nearly) every row is read
    return np.sort(epoch_order(num_rows, seed, 0, shuffle)[: max_steps * global_batch_size])


def precompute(strategy, logps_of, train_ds, train_rows, eval_ds, sequences_per_row: int = 2, **batching) -> torch.Tensor:
    """[train rows + eval rows, sequences_per_row] reference log-probabilities (NaN where not needed), on every rank.

    Each rank computes its shard; an all-reduce of the zero-filled table joins them."""
    env, model = strategy.env, strategy.model
    sources = [(train_ds, train_rows, 0)]
    if eval_ds is not None:
        sources.append((eval_ds, range(len(eval_ds)), len(train_ds)))
    size = sum(len(dataset) for dataset, _, _ in sources)
    table = torch.zeros(size, sequences_per_row, dtype=torch.float64, device=env.device)
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
                heartbeat.beat()
                with torch.no_grad():
                    values = run_forward(strategy, logps_of, micro).double().view(-1, sequences_per_row)
                if real:
                    table[torch.as_tensor(micro.row_ids, device=env.device)] = values
    finally:
        model.train(was_training)
    table = strategy.all_reduce_sum(table).cpu()
    table[~needed] = float("nan")
    return table


def build_reference(
    strategy, spec, plan, run_dir: Path, train_ds, eval_ds, resumed: bool, pad_token_id: int,
    sequences_per_row: int = 2, sums: dict | None = None,
):
    """The job's reference: adapter disabled (LoRA, auto) or a table precomputed now or by the first run.

    `sums`: name -> (length, compute(logps_of) -> [length] fp64 tensor, the same on every rank), what the
    method precomputes beside the table with the same reference; a stored one shorter than `length` (or
    with NaN in it) is computed again, as missing table rows are."""
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
        stored_sums = stored.get("sums", {})
        sums_known = all(
            name in stored_sums and len(stored_sums[name]) >= length and not torch.isnan(stored_sums[name][:length]).any()
            for name, (length, _) in (sums or {}).items()
        )
        if {k: stored.get(k) for k in key} == key and len(table) == len(train_ds) + n_eval and sums_known:
            if not torch.isnan(table[needed]).any():
                log.info("reference log-probabilities read from %s", path)
                return PrecomputedReference(table, stored_sums)
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

    log.info("precomputing reference log-probabilities of %d training and %d eval rows", len(rows), n_eval)
    table = precompute(
        strategy,
        logps_of,
        train_ds,
        rows,
        eval_ds,
        sequences_per_row,
        micro_batch_size=plan.micro_batch_size,
        attention=collate_attention(spec.model.attention, strategy.env.device),
        pad_token_id=pad_token_id,
    )
    computed = {}
    if sums:
        was_training = strategy.model.training
        strategy.model.eval()
        try:
            with torch.no_grad():
                computed = {name: compute(logps_of).double().cpu() for name, (_, compute) in sums.items()}
        finally:
            strategy.model.train(was_training)
    if strategy.env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({**key, "table": table, **({"sums": computed} if computed else {})}, tmp)
        os.replace(tmp, path)
    strategy.barrier()
    return PrecomputedReference(table, computed)
