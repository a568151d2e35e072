"""A real run against a cached matmul peak far below this machine's: MFU is never logged above 1."""

from __future__ import annotations

import json

import torch
from support.e2e import ALPACA, assert_ok, base_job, metrics, sharpen, write_job

from training.env_hooks import PEAK_CACHE


def test_a_run_on_a_bad_cached_peak_logs_no_mfu_above_one_and_drops_it(tiny_model, tmp_path, monkeypatch):
    """The peak cache (SHARPEN_PEAK_CACHE) holds 1 MFLOP/s for this CPU at the ranks' one thread, for each
    matmul engine: an MFU computed against it would be far above 1. Every metrics row has mfu null or at
    most 1, rank 0's log names the peak as wrong, and the cache no longer holds it: the next run measures."""
    from training import flops

    cache = tmp_path / "peak_flops.json"
    monkeypatch.setenv(PEAK_CACHE, str(cache))
    monkeypatch.setattr(flops, "measured_peak_flops", lambda device, dtype, seconds=0.3, matmul=None: 1e6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count (OMP_NUM_THREADS=1), which keys the cached rates
    try:
        flops.cpu_engine_rates()
    finally:
        torch.set_num_threads(threads)
    planted = json.loads(cache.read_text())
    assert planted and all(entry["flops"] == 1e6 for entry in planted.values())

    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, ALPACA, train={"max_steps": 3}))
    assert_ok(sharpen("run", str(job), "--output-dir", str(run_dir), env={PEAK_CACHE: str(cache)}))
    rows = metrics(run_dir)
    assert len(rows) == 3 and all(r["mfu"] is None or 0 < r["mfu"] <= 1 for r in rows), rows
    assert any(r["mfu"] is None for r in rows), "the planted peak never gave an MFU above 1"
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert "looks wrong" in log and str(cache) in log and "re-measured on the next run" in log, log
    assert log.count("looks wrong") == 1
    left = json.loads(cache.read_text()) if cache.exists() else {}
    assert all(entry.get("flops") != 1e6 for entry in left.values()), left
    assert "| mfu |" not in (run_dir / "report.md").read_text()  # no MFU figure from null rows
