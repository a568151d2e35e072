"""`sharpen export`: any checkpoint (DCP from fsdp, ZeRO-3 partitions, a ZeRO-3 LoRA adapter) becomes a
Hugging Face dir that reproduces the trained model's logits, loaded by transformers or PEFT alone.

Real runs (`sharpen run`, started together: process start-up dominates on 2 cores; three of 2 ranks,
a QLoRA one of 1) save checkpoints at steps 2 and 4 and the trained model's logits on a fixed input
(SHARPEN_PROBE_LOGITS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.e2e import EXAMPLES, REPO, assert_ok, base_job, sharpen, write_job

from launcher import cli
from training.env_hooks import PROBE_LOGITS

ALPACA = EXAMPLES / "data" / "alpaca_tiny.jsonl"
RUNS = {  # name: (strategy, finetune, ranks)
    "fsdp": ("fsdp", "full", 2),
    "zero3": ("zero3", "full", 2),
    "zero3-lora": ("zero3", "lora", 2),
    "qlora": ("single", "qlora", 1),
    "moe": ("zero3", "lora", 2),  # a tiny Mixtral, LoRA on its experts too (the `moe_model` fixture)
}
MOE_FINETUNE = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"], "dropout": 0.0}
MOE_AUX = 0.05  # model.router_aux_loss_coef, in place of the config's 0.001


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_llama, corpus_from_jsonl

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model", corpus_from_jsonl(ALPACA), vocab_size=512
    )


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_model, corpus_from_jsonl

    return build_tiny_model(tmp_path_factory.mktemp("moe") / "model", "mixtral", corpus_from_jsonl(ALPACA))


@pytest.fixture(scope="module")
def runs(tiny_model, moe_model, tmp_path_factory) -> Path:
    """RUN/<name>/ with checkpoints/step-2, step-4, and RUN/<name>.probe.pt (the trained model's logits)."""
    root = tmp_path_factory.mktemp("runs")
    started = {}
    for name, (strategy, finetune, ranks) in RUNS.items():
        moe = name == "moe"
        job = base_job(
            moe_model if moe else tiny_model,
            ALPACA,
            finetune={"type": finetune, "r": 8, "alpha": 16, **(MOE_FINETUNE if moe else {})},
            strategy={"name": strategy},
            resources={"gpus_per_node": ranks},
            train={"save_every": 2},
        )
        if moe:
            job["model"]["router_aux_loss_coef"] = MOE_AUX
        env = {**os.environ, "OMP_NUM_THREADS": "1", PROBE_LOGITS: str(root / f"{name}.probe.pt")}
        command = [sys.executable, "-m", "launcher.cli", "run", str(write_job(root / f"{name}.yaml", job))]
        started[name] = subprocess.Popen(
            [*command, "--output-dir", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
    for name, process in started.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}: exit {process.returncode}\n{output}"
    return root


def export(*args: str) -> None:
    """`sharpen export ARGS` in this process (the CLI's own entry point, without a process start)."""
    assert cli.main(["export", *map(str, args)]) == 0


def probe(runs: Path, name: str) -> dict:
    return torch.load(runs / f"{name}.probe.pt")


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


def load_full(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


# -- full weights ------------------------------------------------------------------------------------
def test_fsdp_export_reproduces_trained_logits(runs, tmp_path):
    out = tmp_path / "fsdp-hf"
    assert_ok(sharpen("export", str(runs / "fsdp"), "--to", str(out)))  # as a user runs it
    trained = probe(runs, "fsdp")
    torch.testing.assert_close(
        logits(load_full(out), trained["input_ids"]), trained["logits"], atol=1e-5, rtol=1e-5
    )
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "sharpen-export.json").read_text())["checkpoint"] == "step-4"  # the newest
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_zero3_export_reproduces_trained_logits(runs, tmp_path):
    export(runs / "zero3", "--to", tmp_path / "zero3-hf")
    trained = probe(runs, "zero3")
    model = load_full(tmp_path / "zero3-hf")
    torch.testing.assert_close(logits(model, trained["input_ids"]), trained["logits"], atol=1e-5, rtol=1e-5)


def test_bf16_export_writes_bf16_weights(runs, tmp_path):
    from safetensors import safe_open

    export(runs / "zero3", "--to", tmp_path / "bf16", "--dtype", "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    trained = probe(runs, "zero3")
    got = logits(load_full(tmp_path / "bf16").float(), trained["input_ids"])
    torch.testing.assert_close(got, trained["logits"], atol=0.1, rtol=0.05)  # bf16 rounding, nothing else


def test_intermediate_checkpoint_exports_that_step(runs, tmp_path):
    """step-2 of the same job under fsdp and zero3 (which train to the same numbers) agree, and are not final."""
    trained = probe(runs, "fsdp")
    at_step_2 = {}
    for name in ("fsdp", "zero3"):
        export(runs / name, "--checkpoint", "step-2", "--to", tmp_path / name)
        assert json.loads((tmp_path / name / "sharpen-export.json").read_text())["step"] == 2
        at_step_2[name] = logits(load_full(tmp_path / name), trained["input_ids"])
    torch.testing.assert_close(at_step_2["fsdp"], at_step_2["zero3"], atol=1e-4, rtol=1e-4)
    assert (at_step_2["fsdp"] - trained["logits"]).abs().max() > 1e-3


def test_zero3_run_resumed_on_one_rank_exports_what_it_trained(runs, tmp_path):
    """A 2-rank ZeRO-3 run resumed from step 2 on 1 rank (through a universal checkpoint, converted on
    load) continues the 2-rank losses; its export reproduces the resumed model."""
    from support.e2e import metrics

    run = tmp_path / "zero3-on-1-rank"
    shutil.copytree(runs / "zero3", run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "final")
    resumed_probe = tmp_path / "resumed.probe.pt"
    result = sharpen(
        "resume",
        str(run),
        "--set",
        "resources.gpus_per_node=1",
        env={PROBE_LOGITS: str(resumed_probe)},
    )
    assert_ok(result)
    assert "resumed from" in result.stderr and (run / "checkpoints" / "step-2" / "universal").is_dir()
    straight = {row["step"]: row["loss"] for row in metrics(runs / "zero3")}
    resumed = {row["step"]: row["loss"] for row in metrics(run)}
    assert [resumed[s] for s in (3, 4)] == pytest.approx([straight[s] for s in (3, 4)], rel=1e-5)
    export(run, "--to", tmp_path / "hf")
    trained = torch.load(resumed_probe)
    model = load_full(tmp_path / "hf")
    torch.testing.assert_close(logits(model, trained["input_ids"]), trained["logits"], atol=1e-5, rtol=1e-5)


# -- LoRA --------------------------------------------------------------------------------------------
def test_lora_adapter_and_merged_exports(tiny_model, runs, tmp_path):
    """The adapter (PEFT over the base) and --merge-lora (transformers alone) both give the trained logits;
    a second export into the same dir replaces the first."""
    from peft import PeftModel

    trained = probe(runs, "zero3-lora")
    out = tmp_path / "lora"
    export(runs / "zero3-lora", "--to", out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    base_logits = logits(load_full(tiny_model), trained["input_ids"])
    with_adapter = logits(PeftModel.from_pretrained(load_full(tiny_model), out), trained["input_ids"])
    torch.testing.assert_close(with_adapter, trained["logits"], atol=1e-5, rtol=1e-5)
    assert (with_adapter - base_logits).abs().max() > 1e-3, (
        "the adapter changed nothing: it was exported empty"
    )

    export(runs / "zero3-lora", "--to", out, "--merge-lora")
    assert not (out / "adapter_config.json").exists()  # the earlier export is gone, not mixed in
    merged = logits(load_full(out), trained["input_ids"])
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)


def test_moe_run_trains_its_experts_with_the_router_loss(moe_model, runs, tmp_path):
    """A tiny Mixtral through `sharpen run` (zero3, 2 ranks, LoRA on attention and every expert): the rank
    log names the coefficient and the leaf MoE blocks, metrics.jsonl the router loss (which the logged
    loss includes), and the exported adapter and its merge reproduce the trained logits."""
    from peft import PeftModel
    from support.e2e import metrics

    log = (runs / "moe" / "logs" / "rank-0.log").read_text()
    assert "router load-balancing loss: coefficient 0.05 (model.router_aux_loss_coef)" in log
    assert "LoRA on parameters (PEFT target_parameters): experts.down_proj, experts.gate_up_proj" in log
    assert "zero3: 2 MoE blocks (MixtralSparseMoeBlock) are leaf modules" in log
    rows = [row for row in metrics(runs / "moe") if "loss" in row]
    assert len(rows) == 4 and all(1.0 < row["router_aux_loss"] < 4.0 for row in rows)  # ~top-k when balanced
    trained = probe(runs, "moe")
    out = tmp_path / "moe"
    export(runs / "moe", "--to", out)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    with_adapter = logits(PeftModel.from_pretrained(load_full(moe_model), out), trained["input_ids"])
    torch.testing.assert_close(with_adapter, trained["logits"], atol=1e-5, rtol=1e-5)
    export(runs / "moe", "--to", out, "--merge-lora")
    torch.testing.assert_close(logits(load_full(out), trained["input_ids"]), trained["logits"], atol=1e-5, rtol=1e-5)


def test_qlora_export_is_the_trained_adapter(runs, tmp_path):
    """The DCP checkpoint of a QLoRA run also holds the 4-bit base's quantisation state: the export takes
    the adapter only (the same tensors as the run's final/), and --merge-lora merges it into the
    unquantised base, loadable by transformers alone."""
    from safetensors.torch import load_file

    export(runs / "qlora", "--to", tmp_path / "adapter")
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    final = load_file(runs / "qlora" / "final" / "adapter_model.safetensors")
    assert sorted(exported) == sorted(final) and all(torch.equal(exported[k], final[k]) for k in final)
    export(runs / "qlora", "--to", tmp_path / "merged", "--merge-lora")
    trained = probe(runs, "qlora")
    merged = logits(load_full(tmp_path / "merged"), trained["input_ids"])
    assert merged.shape == trained["logits"].shape and torch.isfinite(merged).all()


# -- bad input: exit 2, one clear message, nothing written ----------------------------------------------
@pytest.fixture
def half_written_run(runs, tmp_path) -> Path:
    """A run dir whose only checkpoint lacks its completion marker (a save interrupted by a crash)."""
    run = tmp_path / "half"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    shutil.copy(runs / "fsdp" / "plan.json", run / "plan.json")
    return run


@pytest.mark.parametrize(
    "case,expected",
    [
        ("unknown run dir", "no such run directory"),
        ("not a run dir", "not a sharpen run directory (no plan.json)"),
        ("no complete checkpoint", "no complete checkpoint to export"),
        ("missing checkpoint", "step-99 does not exist\n  hint: complete checkpoints: step-2, step-4"),
        ("incomplete checkpoint", "is incomplete (no COMPLETE marker"),
        ("merge a full fine-tune", "--merge-lora: {runs}/fsdp is a full fine-tune"),
        ("--to not empty", "not empty and not a previous export (no sharpen-export.json); refusing"),
        ("--to a file", "is a file, not a directory"),
    ],
)
def test_bad_input_exits_2_with_a_message(runs, half_written_run, tmp_path, capsys, case, expected):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine\n")
    to = tmp_path / "out"
    args = {
        "unknown run dir": [tmp_path / "nope", "--to", to],
        "not a run dir": [occupied, "--to", to],
        "no complete checkpoint": [half_written_run, "--to", to],
        "missing checkpoint": [runs / "fsdp", "--checkpoint", "step-99", "--to", to],
        "incomplete checkpoint": [half_written_run, "--checkpoint", "step-4", "--to", to],
        "merge a full fine-tune": [runs / "fsdp", "--merge-lora", "--to", to],
        "--to not empty": [runs / "fsdp", "--to", occupied],
        "--to a file": [runs / "fsdp", "--to", occupied / "notes.txt"],
    }[case]
    assert cli.main(["export", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert expected.format(runs=runs) in err and "Traceback" not in err
    assert not to.exists()
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (
        occupied / "notes.txt"
    ).read_text() == "mine\n"


def test_bad_input_from_the_command_line(runs, tmp_path):
    result = sharpen("export", str(runs / "fsdp"), "--checkpoint", "step-3", "--to", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: --checkpoint step-3:" in result.stderr and "Traceback" not in result.stderr
