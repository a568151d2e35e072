"""A full disk: checkpoint.save's size/free-space decision, its ENOSPC handling, and `sharpen plan`'s notice.
Real runs on a small tmpfs: tests/ranks/test_disk_full.py."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support.planner_job import REPO, job

from launcher.planner import build_plan, checkpoints_on_disk, disk_notice
from launcher.shapes import count_parameters
from training import checkpoint

CHECKPOINT = 40_000  # bytes of the fake strategy's shard


class FakeStrategy:
    """One rank: save_checkpoint writes one shard of CHECKPOINT bytes, or raises `fail`."""

    name = "fake"

    def __init__(self, fail: BaseException | None = None):
        self.env = SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
        self.fail = fail

    def all_reduce_sum(self, tensor):
        return tensor

    def barrier(self):
        pass

    def save_checkpoint(self, directory: Path):
        (directory / "shard.bin").write_bytes(b"x" * (CHECKPOINT // 2))
        if self.fail is not None:
            raise self.fail
        (directory / "shard2.bin").write_bytes(b"x" * (CHECKPOINT // 2))


def save(run_dir: Path, step: int, strategy=None, estimate: int = CHECKPOINT, keep_last: int = 2) -> Path:
    return checkpoint.save(run_dir, step, strategy or FakeStrategy(), {}, keep_last, estimate=estimate)


def test_expected_size_is_the_previous_checkpoint_else_the_estimate(tmp_path):
    assert checkpoint.expected_bytes(tmp_path, 123) == 123
    first = save(tmp_path, 2)
    measured = checkpoint.checkpoint_size(first)
    assert measured >= CHECKPOINT + sum(p.stat().st_size for p in first.iterdir() if p.name.endswith(".json"))
    assert checkpoint.expected_bytes(tmp_path, 123) == measured
    assert checkpoint.free_bytes(tmp_path / "not" / "yet") == checkpoint.free_bytes(tmp_path)  # nearest parent
    assert checkpoint.does_not_fit(measured, measured - 1) and not checkpoint.does_not_fit(measured, measured)


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    previous = save(tmp_path, 2)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: checkpoint.checkpoint_size(previous) - 1)
    with pytest.raises(checkpoint.DiskFullError) as caught:
        save(tmp_path, 4, keep_last=1)
    message = str(caught.value)
    assert "\n" not in message  # the launcher shows a rank's last line
    assert "not enough disk space for checkpoint step-4" in message and str(tmp_path / "checkpoints") in message
    assert "it was not written" in message and "--output-dir" in message
    assert "train.keep_last" not in message  # already 1: no advice to lower it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert checkpoint.verify(previous) == []


def test_the_first_checkpoint_is_measured_against_the_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10_000)
    with pytest.raises(checkpoint.DiskFullError, match="train.keep_last \\(now 2"):
        save(tmp_path, 2, estimate=10_001)
    assert not (tmp_path / "checkpoints" / "step-2.tmp").exists()


@pytest.mark.parametrize("fail", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save's ENOSPC
])
def test_a_full_disk_during_the_write_removes_the_partial_checkpoint(tmp_path, monkeypatch, fail):
    previous = save(tmp_path, 2)
    free = iter([10**9, 4096])  # the check passes; after the failure the disk is full
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: next(free))
    with pytest.raises(checkpoint.DiskFullError, match="the disk filled up while it was written") as caught:
        save(tmp_path, 4, strategy=FakeStrategy(fail=fail))
    assert caught.value.__cause__ is fail
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert checkpoint.verify(previous) == []


def test_other_write_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10**9)
    with pytest.raises(RuntimeError, match="broken"):
        save(tmp_path, 2, strategy=FakeStrategy(fail=RuntimeError("broken")))


def test_enospc_inside_dcps_exception_is_found(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    wrapped = CheckpointException("write", {1: (OSError(errno.ENOSPC, "No space left"), [])})
    assert checkpoint.out_of_space(wrapped, tmp_path)
    assert not checkpoint.out_of_space(RuntimeError("other"), tmp_path)


# -- sharpen plan's notice ---------------------------------------------------------------------------------
def test_checkpoints_on_disk_counts_the_one_being_written_but_no_more_than_the_run_saves():
    def on_disk(**train):
        return checkpoints_on_disk(job("unused", train={"micro_batch_size": 1, "global_batch_size": 2, **train}))

    assert on_disk(max_steps=100, save_every=10, keep_last=2) == 3
    assert on_disk(max_steps=100, save_every=0, keep_last=2) == 1  # only the final one
    assert on_disk(max_steps=20, save_every=10, keep_last=5) == 2  # step 10 and the final step 20


def test_plan_warns_when_the_run_dir_cannot_hold_keep_last_plus_one_checkpoints(tmp_path):
    train = {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": 100, "save_every": 10, "keep_last": 2}
    spec = job(REPO / "examples" / "configs" / "llama3-8b", finetune={"type": "lora", "r": 16}, train=train)
    counts = count_parameters(spec)  # from its config: no weights read
    one = build_plan(spec, tmp_path, counts=counts, free_space=lambda p: 0)[0].checkpoint_bytes
    assert one == 12 * 41_943_040  # fp32 adapter weights and AdamW's two moments
    seen = []

    def notices(free: int) -> list[str]:
        found = build_plan(spec, tmp_path / "run", counts=counts, free_space=lambda p: seen.append(p) or free)[1]
        return [n for n in found if n.startswith("disk:")]

    assert notices(3 * one) == []
    (warning,) = notices(3 * one - 1)
    assert str(tmp_path / "run") in warning and "3 checkpoint(s)" in warning and "train.keep_last" in warning
    assert seen[-1] == (tmp_path / "run").resolve()
    assert disk_notice(spec, tmp_path, one, lambda p: (_ for _ in ()).throw(OSError("gone"))) is None
