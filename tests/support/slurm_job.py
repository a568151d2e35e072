"""The SLURM and two-node tests' job (2 nodes x 1 rank, ddp on gloo) and the losses it gives on 2
local ranks, which every run of it must give."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from support.e2e import ALPACA, assert_ok, base_job, losses, sharpen, write_job

STEPS = 120  # 15-70 ms each here: long enough to signal the job mid-run, short enough for a quick test


@pytest.fixture(scope="module")
def job_file(tiny_model, tmp_path_factory) -> Path:
    """2 nodes × 1 rank on SLURM (ddp on gloo), logging every step."""
    job = base_job(
        tiny_model, ALPACA,
        train={"max_steps": STEPS}, strategy={"name": "ddp"}, resources={"nodes": 2, "gpus_per_node": 1},
        cluster={"kind": "slurm", "slurm": {"time": "00:15:00", "signal_lead_s": 60, "max_requeues": 2}},
    )  # fmt: skip
    return write_job(tmp_path_factory.mktemp("job") / "job.yaml", job)


@pytest.fixture(scope="module")
def local_losses(job_file, tmp_path_factory) -> list[float]:
    """The same job run here by `sharpen run` on 2 local ranks: the numbers every SLURM run must give."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    single_node = ["--set", "resources.nodes=1", "--set", "resources.gpus_per_node=2", "--set", "cluster.kind=local"]
    assert_ok(sharpen("run", str(job_file), *single_node, "--output-dir", str(run_dir)))
    got = losses(run_dir)
    assert len(got) == STEPS and got[-1] < got[0]
    return got


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-6), f"step {step}: {g} on SLURM vs {w} locally"
