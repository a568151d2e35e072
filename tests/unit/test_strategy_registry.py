"""What a strategy declares in strategies/ is all the planner, the job rules and export need: a strategy
registered there alone is planned and checked, the registry loads no torch, and DeepSpeed's sizes and the
checkpoint readers come from one place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import strategies
from launcher.errors import UserError
from launcher.planner import build_plan
from launcher.spec import JobSpec
from strategies import Registered, capabilities, registered_names
from strategies.capabilities import Capabilities
from strategies.footprint.counts import ParamCounts, Setting, TensorInfo
from strategies.footprint.replicated import ReplicatedFootprint
from strategies.job_rules import job_problems

REPO = Path(__file__).resolve().parents[2]
# Llama-3-8B with LoRA r=16 (tests/unit/test_planner.py counts it from the config), as shape-only counts
LLAMA8B_LORA = ParamCounts(8_072_204_288, 41_943_040, 8_030_261_248, 0, 32, 4096, 128256, 14336, 32, 8, 128)


def spec(**sections) -> JobSpec:
    raw = {
        "model": {"path": "example-org/llama3-8b", "dtype": "bf16", "gradient_checkpointing": "full"},
        "finetune": {"type": "lora"},
        "data": {"train": [{"path": "train.jsonl"}], "max_length": 2048},
        "train": {"micro_batch_size": "auto", "global_batch_size": 64},
        "strategy": {"name": "auto"},
        "resources": {"gpus_per_node": 8, "gpu_memory_gb": 80},
        "cluster": {"kind": "slurm"},
        "device": "cuda",
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return JobSpec.model_validate(raw)


def test_the_registry_and_the_footprints_load_no_torch():
    """The planner asks each strategy what a rank holds without importing torch (a 70B plan on a laptop)."""
    modules = "strategies, strategies.job_rules, strategies.footprint.zero, launcher.candidates, launcher.planner"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


class HostAdamFootprint(ReplicatedFootprint):
    """A DDP whose AdamW state lives in host memory: its own bytes, to see the planner use them."""

    def state(self, counts: ParamCounts, s: Setting) -> dict[str, int]:
        out = super().state(counts, s)
        return {**out, "optimizer": 0, "offloaded": out["optimizer"]}


@pytest.fixture
def ddp2(monkeypatch):
    """A throwaway strategy, registered in strategies/ only: a registry entry, a footprint, capabilities
    and a place first in the candidate order of many ranks. launcher/ is not touched."""
    caps = Capabilities(offloads=("optimizer",), compile_conflict="the test's {name}")
    entry = Registered("strategies.ddp", "DDPStrategy", HostAdamFootprint(), caps)
    monkeypatch.setitem(strategies.REGISTRY, "ddp2", entry)
    monkeypatch.setattr(strategies, "CANDIDATES", (("ddp2", "none"), *strategies.CANDIDATES))
    return "ddp2"


def test_a_strategy_registered_in_strategies_alone_is_planned(ddp2):
    plan, _ = build_plan(spec(), Path("unused"), counts=LLAMA8B_LORA)
    by_name = {c["strategy"]: c for c in plan.candidates if c["offload"] == "none"}
    assert [c["strategy"] for c in plan.candidates][:2] == ["ddp2", "ddp"]
    theirs, ddp = by_name["ddp2"]["bytes_per_rank"], by_name["ddp"]["bytes_per_rank"]
    assert theirs["optimizer"] == 0 and theirs["offloaded"] == ddp["optimizer"] > 0  # its footprint's bytes
    assert theirs["params"] == ddp["params"] and theirs["total"] < ddp["total"]
    assert (plan.strategy, plan.chosen) == ("ddp2", by_name["ddp2"])  # first, and it fits
    assert plan.strategy_reason.startswith("the least communication; it fits with")
    assert plan.state_bytes_per_rank == {
        "params": theirs["params"], "grads": theirs["grads"], "optimizer": 0,
        "total": theirs["params"] + theirs["grads"], "offloaded": theirs["offloaded"],
    }  # fmt: skip
    # On 16 GB GPUs the bf16 base alone (15 GiB) fits neither DDP: it is passed over by name
    small, _ = build_plan(spec(resources={"gpu_memory_gb": 16}), Path("unused"), counts=LLAMA8B_LORA)
    assert small.strategy not in ("ddp2", "ddp")
    assert "; ddp2, ddp" in small.strategy_reason and small.strategy_reason.endswith(" do not")
    # Its capabilities: it does not compile, so auto passes over it for the next one
    compiled, _ = build_plan(spec(model={"compile": True}), Path("unused"), counts=LLAMA8B_LORA)
    assert compiled.strategy == "ddp"


def test_a_strategy_registered_in_strategies_alone_is_known_to_the_job_rules(ddp2):
    one_rank = job_problems(spec(strategy={"name": "single"}, resources={"gpus_per_node": 2}))
    assert one_rank == [
        ("strategy.name", "'single' runs one rank, but resources ask for 2 (1 node(s) x 2 gpus_per_node); "
         "use ddp, fsdp, zero1-3, ddp2 or auto"),
    ]  # fmt: skip
    offload = job_problems(spec(strategy={"name": "ddp", "offload": "optimizer"}))
    assert offload == [
        ("strategy.offload", "'optimizer' needs a sharded strategy, not 'ddp': use zero2 (one GPU works too), "
         "zero1, zero3, ddp2, fsdp or auto"),
    ]  # fmt: skip
    assert "ddp2" not in job_problems(spec(strategy={"name": "zero3"}, model={"compile": True}))[0][1]


def test_the_planner_checks_the_rules_of_a_job_built_in_code():
    """A JobSpec that did not come through the job loader (which checks the strategies' rules)."""
    built = spec(strategy={"name": "zero2"}, model={"compile": True})
    with pytest.raises(UserError) as error:
        build_plan(built, Path("unused"), counts=LLAMA8B_LORA)
    assert error.value.message.startswith(
        "model.compile: is not supported with DeepSpeed (zero2), whose ZeRO hooks run inside every layer"
    )


def test_deepspeed_is_configured_with_the_sizes_its_footprint_counts():
    import torch

    from strategies.base import DistEnv, StrategyOptions
    from strategies.deepspeed import DeepSpeedStrategy
    from strategies.footprint.zero import PartitionedFootprint, Zero3Footprint

    hidden, options, env = 64, StrategyOptions(compute_dtype=torch.float32), DistEnv(world_size=2)
    zero3 = DeepSpeedStrategy(options, env, stage=3).deepspeed_config(hidden)["zero_optimization"]
    zero2 = DeepSpeedStrategy(options, env, stage=2).deepspeed_config(hidden)["zero_optimization"]
    threshold = zero3["stage3_param_persistence_threshold"]
    tensors = (TensorInfo(threshold, threshold, "trainable", True, False),
               TensorInfo(threshold + 1, threshold + 1, "trainable", True, False))  # fmt: skip
    counts = ParamCounts(2 * threshold + 1, 2 * threshold + 1, 0, 0, 1, hidden, 100, tensors=tensors)
    setting = Setting(strategy="zero3", world_size=2, compute_dtype="fp32")
    # each tensor halved; the one at the threshold also kept whole on every rank, the larger one not
    assert Zero3Footprint().state(counts, setting)["params"] == 4 * (320 + 321) + 4 * threshold
    # ZeRO-2's buffers: the reduce bucket and one gradient of the largest tensor
    buffers = PartitionedFootprint(2).buffers(counts, Setting(strategy="zero2", world_size=2, compute_dtype="fp32"))
    assert buffers[0] == 4 * zero2["reduce_bucket_size"] + 4 * (threshold + 1)


def test_every_checkpoint_family_has_an_offline_reader(tmp_path):
    import torch

    from strategies.full_weights import READERS, load_full_weights

    assert {capabilities(name).checkpoint_family for name in registered_names()} == set(READERS)
    with pytest.raises(UserError) as error:
        load_full_weights(torch.nn.Linear(2, 2), tmp_path, trainable_only=False)
    assert error.value.message == (
        f"{tmp_path}: neither a DeepSpeed (deepspeed-layout.json) nor a DCP (.metadata) checkpoint"
    )


def test_doctor_requires_the_packages_the_jobs_strategy_declares():
    from launcher.commands.doctor import strategy_packages

    assert strategy_packages(spec(strategy={"name": "zero3"})) == ("deepspeed",)
    assert strategy_packages(spec(strategy={"name": "fsdp"})) == strategy_packages(spec()) == ()
