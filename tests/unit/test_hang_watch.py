"""The hang watch without ranks: a real child process that beats and then stops, a real faulthandler dump,
and the limit each phase of a run gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster.hang_watch import HangWatch, describe, main_thread, parse_threads
from launcher.plan import AUTO_HANG_FLOOR_S, STARTUP_HANG_LIMIT_S
from training.heartbeat import Heartbeat, hang_limit, heartbeat_path

REPO = Path(__file__).resolve().parents[2]


def test_the_limit_of_each_phase():
    # The job's own figure, during steps; start-up and checkpoints never get less than the start-up limit.
    assert hang_limit(20, False, 0.5, 30)[0] == 20
    assert hang_limit(20, True, 0.5, 30)[0] == STARTUP_HANG_LIMIT_S
    assert hang_limit(4000, True, 0.5, 30)[0] == 4000
    # Unset: the floor, ten slowest steps, or the start-up, whichever is largest.
    assert hang_limit(None, False, 2.0, 40)[0] == AUTO_HANG_FLOOR_S
    assert hang_limit(None, False, 90.0, 40)[0] == 900
    assert hang_limit(None, False, 2.0, 700)[0] == 700
    assert "train.hang_timeout_s: 20" in hang_limit(20, False, 0, 0)[1]


def test_a_heartbeat_times_its_steps_and_writes_what_the_watch_reads(tmp_path):
    beat = Heartbeat(tmp_path, 3, None)
    assert beat.snapshot()["limit_s"] == STARTUP_HANG_LIMIT_S  # nothing has been stepped yet
    beat.beat("training", 1, 0)
    beat.step_done(1)  # the first step ends start-up
    assert beat.snapshot()["limit_s"] == max(AUTO_HANG_FLOOR_S, beat.startup_s)
    beat.step_started -= 100  # a 100 s step
    beat.step_done(2)
    assert beat.slowest_step_s >= 100 and beat.snapshot()["limit_s"] >= 1000
    beat.beat("checkpoint")
    assert beat.snapshot()["limit_s"] >= STARTUP_HANG_LIMIT_S
    beat.write()
    written = json.loads(heartbeat_path(tmp_path, 3).read_text())
    assert (written["rank"], written["pid"], written["step"], written["phase"]) == (3, os.getpid(), 2, "checkpoint")


CHILD = textwrap.dedent(
    """
    import sys, time
    from training import heartbeat

    def wait_for_a_peer():
        while True:
            time.sleep(60)

    heartbeat.start(sys.argv[1], 0, 1)
    for step in range(1, 4):
        heartbeat.beat("training", step, 0)
        heartbeat.step_done(step)
    print("stepped", flush=True)
    wait_for_a_peer()
    """
)


def test_the_watch_names_where_a_stopped_rank_waits_and_kills_it(tmp_path):
    """A process that beats, then sleeps in a function for ever: within its 1 s limit (after a start-up
    that counts the 3 fast steps), the watch asks for its stack, names the function, and kills it."""
    (tmp_path / "logs").mkdir()
    log = (tmp_path / "logs" / "rank-0.log").open("a")  # as a rank opens its log: the watch appends to it too
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=log, stderr=log, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        started = time.monotonic()
        with HangWatch(tmp_path, poll_s=0.2) as watch:
            while watch.report is None and time.monotonic() - started < 60:
                time.sleep(0.1)
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
    report = watch.report
    assert report is not None and report.startswith("error: the run hung: no rank made progress for")
    assert "rank 0 at step 3 (training): in wait_for_a_peer (<string>:" in report, report
    assert "train.hang_timeout_s: 1" in report and "no checkpoint was written yet" in report
    # Its stack stays in its log, every thread of it.
    assert "wait_for_a_peer" in (tmp_path / "logs" / "rank-0.log").read_text()


DUMP = """\
Thread 0x00007f1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "{root}/training/heartbeat.py", line 113 in _write_loop
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f2 (most recent call first):
  File "/venv/lib/python3.11/site-packages/deepspeed/utils/nvtx.py", line 33 in wrapped_fn
  File "/venv/lib/python3.11/site-packages/deepspeed/runtime/zero/partition_parameters.py", line 720 in wait
  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1789 in _call_impl
  File "{root}/training/methods/causal_lm.py", line 39 in __call__
  File "{root}/training/forward.py", line 21 in run_forward
  File "{root}/training/loop.py", line 110 in run_steps
  File "{root}/training/worker.py", line 284 in main
  File "<frozen runpy>", line 88 in _run_code
"""


@pytest.mark.parametrize("first", ["heartbeat", "main"])
def test_the_main_thread_is_found_and_described_past_wrappers(first):
    threads = parse_threads(DUMP.format(root=REPO))
    if first == "main":
        threads.reverse()
    frames = main_thread(threads)
    assert frames is not None and frames[0].func == "wrapped_fn"
    assert describe(frames) == (
        "waiting in a collective: wait (deepspeed/runtime/zero/partition_parameters.py:720) <- "
        "__call__ (training/methods/causal_lm.py:39) <- run_forward (training/forward.py:21) <- "
        "run_steps (training/loop.py:110)"
    )


def test_a_rank_srun_started_watches_itself(tmp_path):
    """launch: task_per_rank has no agent above the ranks: a rank that stops moving finds it itself, says
    where it is, and ends with exit 1 (srun then stops the others)."""
    (tmp_path / "logs").mkdir()
    own = CHILD.replace(
        "heartbeat.start(sys.argv[1], 0, 1)",
        "heartbeat.start(sys.argv[1], 0, 1)\n"
        "from cluster.hang_watch import HangWatch\n"
        "HangWatch(sys.argv[1], poll_s=0.2, own=True, on_own_hang=lambda r: print('REPORT', r, flush=True)).__enter__()",
    )
    with (tmp_path / "logs" / "rank-0.log").open("a") as log:
        child = subprocess.run([sys.executable, "-c", own, str(tmp_path)], stdout=subprocess.PIPE, stderr=log,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert child.returncode == 1
    assert "REPORT error: the run hung" in child.stdout and "in wait_for_a_peer (<string>:" in child.stdout, child.stdout
