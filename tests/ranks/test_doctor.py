"""`sharpen doctor`: the real command in a subprocess: versions, a real gloo all-reduce on 2 ranks, an
unreachable rendezvous and a hung test bounded in seconds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from support.e2e import EXAMPLES, assert_ok, base_job, sharpen, write_job

from training.env_hooks import DOCTOR_TIMEOUT_S

ALPACA = EXAMPLES / "data" / "alpaca_tiny.jsonl"
HUB_MODEL = "example-org/tiny-llama"  # a hub id: checked only when downloaded, which the doctor never does
UNREACHABLE = "192.0.2.1:29500"  # TEST-NET-1 (RFC 5737): never a host; refused or unanswered, never reached


def job_file(tmp_path: Path, gpus_per_node: int) -> Path:
    job = base_job(HUB_MODEL, ALPACA, strategy={"name": "ddp"}, resources={"gpus_per_node": gpus_per_node})
    return write_job(tmp_path / "job.yaml", job)


def doctor_json(*args: str, env: dict | None = None) -> tuple[int, dict[str, dict]]:
    result = sharpen("doctor", *args, "--json", env=env, timeout=300)
    assert result.returncode in (0, 1), f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.returncode, {c["check"]: c for c in json.loads(result.stdout)}


def test_without_a_job_prints_versions_and_passes():
    result = sharpen("doctor", timeout=300)
    assert_ok(result)
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.split()[:1] != []}
    for check in ("python", "torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets"):
        assert re.match(rf"ok +{check} +\d+\.\d+", lines[check]), lines.get(check)
    assert "CPU build" in lines["torch"] or "CUDA" in lines["torch"]
    assert re.search(r"^ok +devices +no GPU: CPU with gloo$|^\w+ +gpu 0 ", result.stdout, re.M), result.stdout
    assert re.search(r"\d+ ok, 0 warn, 0 FAIL", result.stdout)


def test_two_rank_cpu_job_measures_gloo_all_reduce(tmp_path):
    code, checks = doctor_json(str(job_file(tmp_path, 2)))
    assert code == 0, checks
    allreduce = checks["all-reduce"]
    assert allreduce["verdict"] == "ok", allreduce
    assert "2 ranks, gloo" in allreduce["detail"] and "values correct" in allreduce["detail"]
    algbw = float(re.search(r"algbw ([\d.]+) GB/s", allreduce["detail"]).group(1))
    busbw = float(re.search(r"busbw ([\d.]+) GB/s", allreduce["detail"]).group(1))
    assert algbw > 0 and busbw == algbw  # 2 ranks: bus = 2(n-1)/n × alg = alg
    assert checks["cpu"]["detail"].startswith("2 rank(s) per node on")
    assert checks["slurm"]["verdict"] == "skip"


def test_unreachable_master_and_hung_test_fail_within_seconds(tmp_path):
    """One run for both bounds (each doctor run imports every package, slow on a small machine): the
    rendezvous check names the address, and an all-reduce test past its limit is stopped and named."""
    start = time.monotonic()
    code, checks = doctor_json(
        str(job_file(tmp_path, 2)), "--master", UNREACHABLE, env={DOCTOR_TIMEOUT_S: "1"}
    )
    elapsed = time.monotonic() - start
    assert code == 1
    assert checks["rendezvous"]["verdict"] == "FAIL" and UNREACHABLE in checks["rendezvous"]["detail"]
    assert (
        checks["all-reduce"]["verdict"] == "FAIL" and "no result within 1 s" in checks["all-reduce"]["detail"]
    )
    assert elapsed < 60, f"took {elapsed:.0f} s"
