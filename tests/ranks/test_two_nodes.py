"""`sharpen run --nnodes 2` on two machines without SLURM (here twice on one): they train like 2 local
ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import slurm_job
from support.e2e import assert_ok, losses, sharpen
from support.slurm_job import assert_same_losses

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
job_file = slurm_job.job_file
local_losses = slurm_job.local_losses


# -- against the real cluster ---------------------------------------------------------------------------


def test_run_on_two_machines_without_slurm(job_file, local_losses, tmp_path):
    """`sharpen run --nnodes 2 --node-rank K --master HOST:PORT` on each machine (here twice on one):
    node 0 hosts the rendezvous, and the two 1-rank nodes train like 2 local ranks."""
    from cluster.environment import free_port

    master = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    args = ["run", str(job_file), "--set", "cluster.kind=local", "--output-dir", str(run_dir), "--nnodes", "2"]
    other = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args, "--node-rank", "1", "--master", master],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert_ok(sharpen(*args, "--node-rank", "0", "--master", master))
        out, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    assert other.returncode == 0, out
    assert_same_losses(losses(run_dir), local_losses)
    bad = sharpen(*args, "--node-rank", "1", "--master", "no-such-host.invalid:29500")
    assert bad.returncode == 2 and "cannot resolve 'no-such-host.invalid'" in bad.stderr


def test_a_node_that_never_comes_is_named(job_file, tmp_path):
    """Node 0 started alone: the rendezvous does not hang for ever, and the message names the node that
    never arrived and the one that did, exit 1, no traceback."""
    from cluster.environment import free_port

    run_dir = tmp_path / "alone"
    result = sharpen(
        "run", str(job_file), "--set", "cluster.kind=local", "--set", "cluster.rendezvous_timeout_s=5",
        "--output-dir", str(run_dir), "--nnodes", "2", "--node-rank", "0", "--master", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "did not complete within 5 s (cluster.rendezvous_timeout_s): 1 of 2 node(s) never arrived: node 1" in result.stderr
    assert "arrived: node 0" in result.stderr and "Traceback" not in result.stderr
    assert not list((run_dir / "logs" / "agent" / "arrived").iterdir())  # node 0's mark is gone with it
