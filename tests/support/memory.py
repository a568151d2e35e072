"""Counting the bytes a piece of code allocates, or keeps for its backward, on the CPU.

Shared by the tests and by bench/ (bench_checkpointing.py, bench_loss_memory.py): one way to measure.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def allocated_during(fn: Callable[[], Any]) -> tuple[Any, list[int]]:
    """(what `fn()` returns, the CPU bytes allocated above the start after each allocator event while it
    ran), from the torch profiler's memory events: its peak is max(), what it left allocated the last."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return result, [e["Total Allocated"] - start for e in events]


def saved_storage_bytes(run: Callable[[], Any], params: Iterable) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `run()` builds its graph,
    leaving out the storages of `params`."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def saved_for_backward_bytes(model, x, seed: int = 0) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (not the parameters)."""
    import torch

    torch.manual_seed(seed)
    return saved_storage_bytes(lambda: model(x.clone().requires_grad_(True)).sum(), model.parameters())


def measured_peak(model, ids, mask, grads_allocated: bool = True, autocast: bool = False) -> int:
    """Peak bytes the CPU allocator hands out during forward, loss and backward (by default with the grads
    already allocated; else set to None, as the strategies' step leaves them)."""
    import contextlib

    import torch

    def step():
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[0], reduction="sum")
        del logits
        loss.backward()

    step()
    # grads_allocated: gradients stay allocated, the profiled peak is activations only
    model.zero_grad(set_to_none=not grads_allocated)
    return max(allocated_during(step)[1])
