"""Every SHARPEN_* environment variable, in one place: test and drill hooks, never part of a job.

A run is described by its job file and RUN/plan.json alone; these only let tests and drills reach into
one (inject a fault, save a probe, wait less). Each is read by the module named beside it, by this name.
cluster/ and launcher/ import it from here; strategies/ reads none.
"""

from __future__ import annotations

# training/faults.py: hit a rank at a point of the run, POINT:STEP[@RANK] (kill-after-step:3, kill-in-save:4@1,
# fill-disk-in-save:4, hang-after-step:3@1)
FAULT = "SHARPEN_FAULT"
# training/worker.py: a file to save final/'s model logits on a fixed probe into (tests check the export)
PROBE_LOGITS = "SHARPEN_PROBE_LOGITS"
# cluster/local.py: seconds a node other than 0 waits for the rendezvous endpoint to accept (default 30)
RDZV_CONNECT_TIMEOUT_S = "SHARPEN_RDZV_CONNECT_TIMEOUT_S"
# cluster/checks.py: seconds doctor's communication test may take before it is reported hung (default 120)
DOCTOR_TIMEOUT_S = "SHARPEN_DOCTOR_TIMEOUT_S"
# tests/unit/test_sbatch.py: set to rewrite the golden sbatch files instead of comparing against them
UPDATE_GOLDEN = "SHARPEN_UPDATE_GOLDEN"
# bench/gpu_session.sh (shell, so it cannot import this): the GPU session's work directory
GPU_WORK = "SHARPEN_GPU_WORK"
# training/flops.py: the matmul peak cache file, instead of ~/.cache/sharpen/peak_flops.json (tests plant a bad peak)
PEAK_CACHE = "SHARPEN_PEAK_CACHE"
