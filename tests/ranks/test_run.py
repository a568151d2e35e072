"""End to end: `sharpen run` on real ranks (gloo), every strategy, the numbers compared."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.e2e import ALPACA, REPO, assert_ok, base_job, losses, metrics, sharpen, write_job
from support.run_job import two_ranks

from training.env_hooks import PROBE_LOGITS


def run_job(tmp_path: Path, name: str, job: dict, env: dict | None = None) -> Path:
    run_dir = tmp_path / name
    job_file = write_job(tmp_path / f"{name}.yaml", job)
    assert_ok(sharpen("run", str(job_file), "--output-dir", str(run_dir), env=env))
    return run_dir


@pytest.fixture(scope="module")
def reference_losses(tiny_model, tmp_path_factory) -> dict[str, list[float]]:
    """One rank, micro batch 2 × accumulation 4: the losses every strategy must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for finetune in ("full", "lora"):
        job = base_job(tiny_model, ALPACA, finetune={"type": finetune, "r": 8, "alpha": 16})
        out[finetune] = losses(run_job(tmp, f"single-{finetune}", job))
    return out


@pytest.mark.parametrize(
    "finetune,strategy",
    # Every strategy with full and LoRA is compared in-process by test_strategies.py; end to end, DDP, FSDP2
    # and DeepSpeed each appear once here (zero1 and zero2 are DeepSpeed's engine with the stage changed, which
    # test_strategies.py and test_resharding.py run), and fsdp/zero3 full again in the final/ and export tests.
    [("full", "ddp"), ("lora", "fsdp"), ("lora", "zero3")],
)
def test_two_ranks_reproduce_single_rank_losses(tiny_model, reference_losses, tmp_path, finetune, strategy):
    job = base_job(tiny_model, ALPACA, finetune={"type": finetune, "r": 8, "alpha": 16}, **two_ranks(strategy))
    got = losses(run_job(tmp_path, strategy, job))
    want = reference_losses[finetune]
    assert len(got) == len(want) == 4
    assert want[-1] < want[0], "the reference run did not learn"
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-4), f"step {step}: {strategy} {g} vs single {w}"


def test_ddp_on_one_rank_is_single(tiny_model, reference_losses, tmp_path):
    """A launcher starts no process group for a world of one; DDP (like DeepSpeed) makes its own."""
    job = base_job(tiny_model, ALPACA, finetune={"type": "lora", "r": 8, "alpha": 16}, strategy={"name": "ddp"})
    assert losses(run_job(tmp_path, "ddp-1", job)) == pytest.approx(reference_losses["lora"], rel=1e-6)


@pytest.mark.parametrize("engine", ["aten", "onednn"])
def test_both_cpu_matmul_engines_train_to_the_same_losses(tiny_model, reference_losses, tmp_path, engine):
    """model.cpu_matmul (training/kernels/cpu_gemm.py): every linear of a full fine-tune on oneDNN (chosen
    where it is faster, as on AMD cores) or on aten's mm; the reference run took whichever this machine
    prefers. The engine run is the one plan.json and report.md name."""
    from training.kernels.cpu_gemm import onednn_available

    if engine == "onednn" and not onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    job = base_job(tiny_model, ALPACA, model={"path": str(tiny_model), "cpu_matmul": engine}, finetune={"type": "full"})
    run_dir = run_job(tmp_path, engine, job)
    assert losses(run_dir) == pytest.approx(reference_losses["full"], rel=1e-5)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert ("matmuls on oneDNN" in log) == (engine == "onednn"), log
    assert f"CPU matmul engine: {engine} (model.cpu_matmul: {engine}; decided when planning)" in log
    assert json.loads((run_dir / "plan.json").read_text())["cpu_matmul"] == engine
    assert f"| cpu_matmul | {engine} |" in (run_dir / "report.md").read_text()


def test_two_machines_whose_caches_disagree_run_rank_0s_engine(tiny_model, tmp_path, monkeypatch):
    """`sharpen run --nnodes 2`, node by node, on two "machines": a HOME each, so a cache of matmul rates
    each, node 0's saying oneDNN is faster here, node 1's that aten is. Planned on one node of several,
    auto is left to the ranks: rank 0 decides from its cache and both ranks run oneDNN, which plan.json
    and report.md then name. Alone, node 1 would have run aten."""
    from cluster.environment import free_port
    from training import flops
    from training.kernels import cpu_gemm

    if not cpu_gemm.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    homes = [tmp_path / "home0", tmp_path / "home1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count (OMP_NUM_THREADS=1), which keys the cached rates
    try:
        for home, rates in zip(homes, ({"aten": 1e11, "onednn": 2.2e11}, {"aten": 2e11, "onednn": 1e11}), strict=True):
            monkeypatch.setattr(flops, "measured_peak_flops", lambda device, dtype, seconds=0.3, matmul=None, r=rates:
                                r["onednn" if matmul is cpu_gemm.onednn_linear else "aten"])
            flops.cpu_engine_rates(home / flops.PEAK_CACHE.relative_to("~"))
    finally:
        torch.set_num_threads(threads)
    job = write_job(tmp_path / "job.yaml", base_job(tiny_model, ALPACA, train={"max_steps": 2}, strategy={"name": "ddp"}))
    run_dir, master = tmp_path / "run", f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "run", str(job), "--output-dir", str(run_dir),
             "--nnodes", "2", "--node-rank", str(rank), "--master", master],
            env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home)}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, home in enumerate(homes)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "CPU matmul engine: onednn (model.cpu_matmul: auto; rank 0's choice" in log, log
        assert "matmuls on oneDNN" in log, log
    assert json.loads((run_dir / "plan.json").read_text())["cpu_matmul"] == "onednn"
    assert "| cpu_matmul | onednn |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("strategy,ranks", [("fsdp", 2)])  # one rank compiles the same layers, unsharded
def test_compiled_layers_train_to_the_same_losses(tiny_model, reference_losses, tmp_path, strategy, ranks):
    """model.compile: each decoder layer compiled in place (inductor on CPU), under FSDP2."""
    job = base_job(
        tiny_model, ALPACA, model={"path": str(tiny_model), "compile": True},
        finetune={"type": "lora", "r": 8, "alpha": 16}, strategy={"name": strategy},
        resources={"gpus_per_node": ranks},
    )
    run_dir = run_job(tmp_path, f"compiled-{strategy}", job)
    assert losses(run_dir) == pytest.approx(reference_losses["lora"], rel=1e-4)
    graphs = re.search(r"^\| compiled_graphs \| (\d+) \|$", (run_dir / "report.md").read_text(), re.MULTILINE)
    assert graphs and int(graphs.group(1)) >= 1, "nothing was compiled"


def test_accumulation_and_micro_batch_do_not_change_the_losses(tiny_model, tmp_path, capsys):
    """Same global batch, split 1×8 or 8×1: identical losses at every step. Normalising per micro-batch
    (the 2024 transformers accumulation bug) would make step 2 onwards differ. `sharpen compare` of the
    two runs shows each one's figures as its metrics.jsonl has them."""
    from launcher.cli import main

    runs, dirs = {}, {}
    for micro in (1, 8):
        job = base_job(tiny_model, ALPACA, train={"micro_batch_size": micro, "max_steps": 3})
        dirs[micro] = run_job(tmp_path, f"micro{micro}", job)
        runs[micro] = losses(dirs[micro])
    for a, b in zip(runs[1], runs[8], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), runs

    picture = tmp_path / "cmp.png"
    assert main(["compare", str(dirs[1]), str(dirs[8]), "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["micro1", "micro8"] in lines  # the header: one column per run, named by its directory
    table = {" ".join(cells[:-2]): cells[-2:] for cells in lines if len(cells) >= 3}
    for column, micro in enumerate((1, 8)):
        rows = metrics(dirs[micro])
        assert table["steps"][column] == "3"
        assert table["first loss"][column] == f"{rows[0]['loss']:.4f}"
        assert table["final loss"][column] == f"{rows[-1]['loss']:.4f}"
        assert table["min loss"][column] == f"{min(r['loss'] for r in rows):.4f}"
        assert table["tokens/s"][column] == f"{statistics.median(r['tokens_per_s'] for r in rows[1:]):,.0f}"
        assert table["wall time"][column] == f"{rows[-1]['elapsed_s']:.1f}s"
        assert [table[k][column] for k in ("strategy", "ranks", "method", "fine-tune")] == ["single", "1", "sft", "full"]
    assert "final eval loss" not in out  # neither run evaluates
    assert f"curves: {picture}" in out and picture.stat().st_size > 0


def test_final_full_weights_reproduce_trained_logits(tiny_model, tmp_path):
    """fsdp on 2 ranks: final/ (gathered shards) loads with transformers and gives the training model's logits."""
    from transformers import AutoModelForCausalLM

    probe = tmp_path / "probe.pt"
    job = base_job(tiny_model, ALPACA, **two_ranks("fsdp"))
    run_dir = run_job(tmp_path, "fsdp-final", job, env={PROBE_LOGITS: str(probe)})
    trained = torch.load(probe)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    with torch.no_grad():
        logits = model(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(logits, trained["logits"], atol=1e-5, rtol=1e-5)
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "final" / "tokenizer.json").is_file()


def test_final_lora_adapter_reproduces_trained_logits(tiny_model, tmp_path):
    """zero3 on 2 ranks: final/ is a PEFT adapter (not empty, not one rank's shard)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = tmp_path / "probe.pt"
    job = base_job(tiny_model, ALPACA, finetune={"type": "lora", "r": 8, "alpha": 16}, **two_ranks("zero3"))
    run_dir = run_job(tmp_path, "zero3-lora", job, env={PROBE_LOGITS: str(probe)})
    trained = torch.load(probe)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(input_ids=trained["input_ids"]).logits
    model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    with torch.no_grad():
        logits = model(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(logits, trained["logits"], atol=1e-5, rtol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-4, "the adapter changed nothing: it was saved empty"


def test_qlora_trains_on_one_and_two_ranks(tiny_model, tmp_path):
    for ranks, strategy in ((1, "single"), (2, "ddp")):
        job = base_job(
            tiny_model,
            ALPACA,
            finetune={"type": "qlora", "r": 8, "alpha": 16},
            train={"max_steps": 8, "lr": 3.0e-3},
            strategy={"name": strategy},
            resources={"gpus_per_node": ranks},
        )
        got = losses(run_job(tmp_path, f"qlora{ranks}", job))
        assert len(got) == 8 and all(math.isfinite(x) for x in got)
        assert sum(got[-3:]) / 3 < sum(got[:3]) / 3, got


def test_metrics_checkpoints_logs_and_wandb_offline(tiny_model, tmp_path):
    job = base_job(
        tiny_model,
        ALPACA,
        train={"max_steps": 4, "save_every": 2},
        logging={"every": 2, "progress": False, "wandb": {"project": "sharpen-tests", "mode": "offline"}},
        **two_ranks("ddp"),
    )
    run_dir = run_job(tmp_path, "wandb", job, env={"WANDB_API_KEY": "secret-key-never-written"})
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in rows), key
    assert all(0 < r["mfu"] < 1 for r in rows)
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "| final_loss |" in (run_dir / "report.md").read_text()
    assert rows[1]["tokens"] > rows[0]["tokens"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and (run_dir / "wandb_id").read_text().strip() in offline[0].name
    for path in [run_dir / "plan.json", *(run_dir / "logs").glob("*.log")]:
        assert "secret-key-never-written" not in path.read_text()

    # What `sharpen status | logs | runs` tell a user of this finished local run.
    status = sharpen("status", str(run_dir), "--json")
    assert_ok(status)
    state = json.loads(status.stdout)
    assert (state["state"], state["kind"], state["step"], state["max_steps"]) == ("finished", "local", 4, 4)
    assert state["loss"] == rows[-1]["loss"] and state["checkpoint_step"] == 4 and state["eta_s"] is None
    assert state["final"] == str(run_dir / "final") and 0 < state["elapsed_s"] < 600
    status = sharpen("status", str(run_dir))
    assert_ok(status)
    assert "state: finished\n" in status.stdout and f"progress: step 4 of 4, loss {rows[-1]['loss']:.4f}" in status.stdout
    assert f"newest checkpoint: step 4 ({run_dir / 'checkpoints' / 'step-4'})" in status.stdout
    assert f"log: {run_dir / 'logs' / 'rank-0.log'}" in status.stdout
    log = sharpen("logs", str(run_dir), "--rank", "0")
    assert_ok(log)
    assert f"done: step 4, loss {rows[-1]['loss']:.4f}" in log.stdout
    table = sharpen("runs", str(tmp_path))
    assert_ok(table)
    assert table.stdout.splitlines()[1].split()[:8] == ["wandb", "sft", "full", "ddp", "2", "finished", "4/4",
                                                        f"{rows[-1]['loss']:.4f}"]  # fmt: skip
