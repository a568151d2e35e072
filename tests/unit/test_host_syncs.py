"""No host-device synchronisation inside a training step: the host only waits for the device on the steps
that log (issue 7's "read values only when logging").

There is no GPU here, so the steps run on the CPU under a watch that knows which ops make a CUDA host
wait for its device: `.item()`/`float()`/`bool()` of a tensor, `nonzero` (also behind boolean indexing
and one-argument `where`), `masked_select`, `unique`, `equal`, `repeat_interleave` without a size, and a
blocking device-to-host copy. It flags them only on tensors that a GPU run would hold on the device: the
model's parameters, tensors moved or made on a torch.device (the run's, a parameter's: the loop moves
each micro-batch with `.to(env.device)`), and everything computed from those; moving a tensor there
without `non_blocking` is flagged too (torch then syncs the stream). Host-side tensors (an index list, a table kept on the host)
stay quiet, as they would on a GPU. The loop, the methods, the optimizer and the SLURM stop poll are
the real ones; the model takes the path a bf16 GPU run takes (PEFT's LoRA forward, no CPU-only kernels).
"""

from __future__ import annotations

import time
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from support.e2e import ALPACA, EXAMPLES, base_job
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launcher.spec import JobSpec
from strategies.base import DistEnv, StrategyOptions
from strategies.single import SingleStrategy
from training.data.cache import load_prepared
from training.data.prepare import prepare_dataset
from training.data.sampler import step_batches
from training.kernels.fused_loss import fuse_head_loss
from training.kernels.last_layer import prune_last_layer
from training.loop import LoopConfig, run_steps
from training.methods import create_method
from training.trackers import Trackers

PREFS = EXAMPLES / "data" / "preference_tiny.jsonl"
STEPS = 4  # only the last one logs

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), float(), int(), bool() of one element
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
    aten.repeat_interleave.self_Tensor,
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# transformers 5 looks for packed rows in position_ids whenever a forward gets no attention mask (a row
# of one sequence), one `.all()` a forward: HF Trainer pays it too, and a 4D mask instead would cost T^2.
TRANSFORMERS_OWN = {"find_packed_sequence_indices"}
FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty, torch.arange, torch.tensor, torch.as_tensor}


def tensors_in(*trees) -> list[torch.Tensor]:
    return [x for tree in trees for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class DeviceWatch(TorchDispatchMode):
    """Records the ops that would make a CUDA host wait, on tensors a GPU run would keep on the device."""

    def __init__(self):
        super().__init__()
        self._device: dict[int, weakref.ref] = {}  # id -> the tensor (tensors compare by value, not identity)
        self.events: list[tuple[str, str]] = []  # ("sync", what and where) or ("step", n)

    def mark(self, tensors) -> None:
        self._device.update((id(t), weakref.ref(t)) for t in tensors)

    def is_device(self, tensor: torch.Tensor) -> bool:
        ref = self._device.get(id(tensor))
        return ref is not None and ref() is tensor

    def on_device(self, tensors) -> bool:
        return any(self.is_device(t) for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tensors_in(args, kwargs)
        out = func(*args, **kwargs)
        if not self.on_device(inputs):
            return out
        if func in SYNCING:
            self.flag(str(func))
        elif func in BOOL_INDEXED and any(i.dtype in (torch.bool, torch.uint8) for i in tensors_in(args[1])):
            self.flag(f"{func} with a boolean index")
        if func is aten.copy_.default and (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
            return out  # an asynchronous copy into host memory: read after an event, it stays host-side
        if func is aten.copy_.default and not self.is_device(args[0]):
            self.flag("a blocking device-to-host copy_")
        self.mark(tensors_in(out))
        return out

    def flag(self, what: str) -> None:
        """Name the op, the innermost frame outside torch and this file, and the innermost of sharpen's."""
        stack = [f for f in traceback.extract_stack() if f.filename != __file__]
        if any(f.name in TRANSFORMERS_OWN for f in stack):
            return
        ours = [f for f in stack if any(f"/{d}/" in f.filename for d in ("training", "strategies", "cluster"))]
        theirs = [f for f in stack if "/torch/" not in f.filename]
        where = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in (theirs + ours)[-1:]]
        if ours and theirs and theirs[-1] is not ours[-1]:
            where.append(f"{Path(ours[-1].filename).name}:{ours[-1].lineno}")
        self.events.append(("sync", f"{what} at {' in '.join(where) or 'torch'}"))


class ExplicitDevice(TorchFunctionMode):
    """Tensors made with `device=` a torch.device (the run's, a parameter's, a tensor's) are device tensors
    in a GPU run; here that device is the CPU. A literal `device="cpu"` means the host (AdamW's steps)."""

    def __init__(self, watch: DeviceWatch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and isinstance(kwargs.get("device"), torch.device):
            self.watch.mark(tensors_in(out))
        elif func is torch.Tensor.to and any(isinstance(a, torch.device) for a in [*args[1:], *kwargs.values()]):
            if not kwargs.get("non_blocking", False) and not self.watch.is_device(args[0]):
                self.watch.flag("a blocking host-to-device copy")  # torch syncs the stream after it
            self.watch.mark(tensors_in(out))
        return out


def sft_job(model: Path, cache: Path, finetune: str) -> dict:
    return base_job(model, ALPACA, finetune={"type": finetune, "r": 8, "alpha": 16, "dropout": 0.1},
                    data={"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_length": 128,
                          "cache_dir": str(cache)})


def preference_job(model: Path, cache: Path, kind: str, finetune: str) -> dict:
    return base_job(model, PREFS, finetune={"type": finetune, "r": 8, "alpha": 16}, method={"kind": kind},
                    data={"train": [{"path": str(PREFS), "format": "preference"}], "max_length": 96,
                          "cache_dir": str(cache)})


CASES = {
    "sft-lora": lambda m, c: sft_job(m, c, "lora"),
    "sft-full": lambda m, c: sft_job(m, c, "full"),
    "dpo-lora": lambda m, c: preference_job(m, c, "dpo", "lora"),  # the adapter-disabled reference
    "dpo-full": lambda m, c: preference_job(m, c, "dpo", "full"),  # a reference table kept on the host
    "reward-lora": lambda m, c: preference_job(m, c, "reward", "lora"),
    "orpo-full": lambda m, c: preference_job(m, c, "orpo", "full"),  # no reference
    "simpo-lora": lambda m, c: preference_job(m, c, "simpo", "lora"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_device_sync_in_a_step_that_does_not_log(case, tiny_model, tmp_path):
    from training.methods.dpo_reference import AdapterDisabledReference, PrecomputedReference
    from training.model import load_model

    spec = JobSpec.model_validate(CASES[case](tiny_model, tmp_path / "cache"))
    dataset = load_prepared(prepare_dataset(spec.data, spec.method.kind, str(tiny_model), cache_root=tmp_path / "c"))
    torch.manual_seed(0)
    model = load_model(spec, "fp32", torch.device("cpu"))
    strategy = SingleStrategy(StrategyOptions(), DistEnv())
    strategy.setup(model, lambda params: torch.optim.AdamW(params, lr=1e-3),
                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    prune_last_layer(strategy.model)  # as the worker does (SFT only; a no-op otherwise)
    fuse_head_loss(strategy.model)  # as the worker does (SFT, pretraining)
    reference = None
    if spec.method.kind == "dpo":
        reference = (AdapterDisabledReference(strategy.model) if spec.finetune.type == "lora"
                     else PrecomputedReference(torch.zeros(len(dataset), 2, dtype=torch.float64)))
    method = create_method(spec.method.kind, spec.method, reference)

    watch = DeviceWatch()
    watch.mark(list(strategy.model.parameters()) + list(strategy.model.buffers()))

    batches = step_batches(dataset, global_batch_size=4, micro_batch_size=1, grad_accum=4, rank=0, world_size=1,
                           seed=0, attention="sdpa")  # the dense block mask a GPU run collates
    from training.preemption import stop_request
    from training.stop_signals import StopSignals

    cfg = LoopConfig(max_steps=STEPS, log_every=100, save_every=0, keep_last=1, world_size=1, show_progress=False,
                     evaluate=lambda step: watch.events.append(("step", step)),
                     # the SLURM stop poll, as the worker sets it inside a SLURM job: a collective every step
                     should_stop=stop_request(strategy, tmp_path / "stop", tmp_path / "term", 15.0, StopSignals()))
    (tmp_path / "run").mkdir()
    with ExplicitDevice(watch), watch:
        last = run_steps(cfg, strategy, method, batches, 0, tmp_path / "run", None,
                         Trackers(), {})
    assert last["step"] == STEPS and torch.isfinite(torch.tensor(last["loss"]))

    boundary = watch.events.index(("step", STEPS - 1))
    in_steps = [what for kind, what in watch.events[:boundary] if kind == "sync"]
    assert not in_steps, f"{case}: the host waits for the device inside steps 1-{STEPS - 1}: {in_steps}"
    logging = [what for kind, what in watch.events[boundary:] if kind == "sync"]
    assert any("loop.py" in what for what in logging), "the watch saw no sync at all, even where the loop logs"


def test_a_stop_request_is_read_one_step_later_on_every_rank(tmp_path):
    """The SLURM stop poll reduces this step's flags and returns the previous step's: a request made after
    step k stops the run after step k + 1, and a run that saw none goes on."""
    from cluster.slurm import STOP_FILE, TERM_FILE
    from training.preemption import REQUEUE, stop_request
    from training.stop_signals import StopSignals

    should_stop = stop_request(SingleStrategy(StrategyOptions(), DistEnv()), tmp_path / STOP_FILE,
                               tmp_path / TERM_FILE, 15.0, StopSignals())
    assert [should_stop(), should_stop()] == [None, None]
    (tmp_path / STOP_FILE).parent.mkdir(parents=True)
    (tmp_path / STOP_FILE).touch()
    assert should_stop() is None  # this step's flags are on their way
    request = should_stop()
    assert request is not None and (request.kind, request.checkpoint) == (REQUEUE, True)


@pytest.mark.parametrize("how", ["signal", "file"])
def test_sigterm_checkpoints_within_the_grace_period_and_not_after(tmp_path, how):
    """SIGTERM, sent to the rank or written by the batch shell's trap: a checkpoint if the step boundary
    comes within grace_s of it, else a stop without one (SLURM would kill a checkpoint half written)."""
    import os

    from cluster.slurm import STOP_FILE, TERM_FILE
    from training.preemption import TERMINATE, stop_request
    from training.stop_signals import StopSignals

    def request_after(seconds_ago: float):
        signals = StopSignals()
        term_file = tmp_path / f"{seconds_ago}" / TERM_FILE
        if how == "signal":
            signals.term_at = time.time() - seconds_ago
        else:
            term_file.parent.mkdir(parents=True)
            term_file.touch()
            os.utime(term_file, (time.time() - seconds_ago,) * 2)
        should_stop = stop_request(SingleStrategy(StrategyOptions(), DistEnv()), tmp_path / STOP_FILE, term_file,
                                   10.0, signals)
        assert should_stop() is None
        return should_stop()

    soon = request_after(1.0)
    assert (soon.kind, soon.checkpoint, soon.grace_s) == (TERMINATE, True, 10.0)
    late = request_after(30.0)
    assert (late.kind, late.checkpoint) == (TERMINATE, False)


def test_real_usr2_and_sigterm_are_remembered_not_obeyed(tmp_path):
    """The handlers a rank installs on SLURM, sent the real signals: the process lives on, and the next
    steps' agreement turns them into the stop requests (SIGTERM wins: the job is going away)."""
    import os
    import signal

    from training.preemption import REQUEUE, TERMINATE, stop_request
    from training.stop_signals import StopSignals

    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        signals = StopSignals().install()
        should_stop = stop_request(SingleStrategy(StrategyOptions(), DistEnv()), tmp_path / "stop", tmp_path / "term",
                                   10.0, signals)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert should_stop() is None and should_stop().kind == REQUEUE
        os.kill(os.getpid(), signal.SIGTERM)
        should_stop()
        request = should_stop()
        assert (request.kind, request.checkpoint) == (TERMINATE, True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
