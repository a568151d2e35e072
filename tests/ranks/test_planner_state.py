"""The planner's params, grads and optimizer bytes against what 2 real gloo ranks hold, to the byte, for
every strategy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support import dist_harness
from support.planner_job import job

from launcher.plan import Plan
from launcher.planner import build_plan
from launcher.shapes import count_parameters
from strategies import footprint
from strategies.footprint.counts import Setting

# Odd sizes on purpose: vocab 421 and the 51-row MLP projections shard unevenly under FSDP2 (rank 0 holds
# more), the trainable element counts (57,834 full, 3,354 LoRA r=3) are not multiples of ZeRO-1/2's 2 x ranks,
# and ZeRO-3 pads odd tensors (153 elements) and keeps those of at most 10 x hidden elements whole.
ODD = dict(hidden_size=42, intermediate_size=51, num_layers=2, num_heads=3, num_kv_heads=1)
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")


# -- params, grads, optimizer: predicted == held by real ranks -----------------------------------------
def measure(env, plans: dict[str, Plan]) -> dict[str, dict]:
    """Each plan's strategy, set up as a rank does (training/model.py, training/worker.py), two steps of two
    micro-steps: params and grads at their most over the second step's micro-steps, optimizer after it."""
    from strategies.base import DistEnv
    from training.model import load_model
    from training.worker import build_strategy

    out = {}
    for name, plan in plans.items():
        rank_env = env if plan.world_size > 1 else DistEnv(rank=env.rank, local_rank=env.rank)
        torch.manual_seed(0)
        strategy = build_strategy(
            plan, rank_env, load_model(plan.spec, plan.compute_dtype, torch.device("cpu"))
        )
        # Measured before the first forward: bitsandbytes' CPU backend then re-packs the weights (un-nested
        # absmax), the GPU keeps the layout loaded.
        scales = quant_state_bytes(strategy.unwrap())
        ids = torch.randint(8, 400, (1, 16), generator=torch.Generator().manual_seed(env.rank))
        most = {"params": 0, "grads": 0}
        for step in range(2):
            for micro in range(plan.grad_accum):
                with strategy.accumulate(micro == plan.grad_accum - 1), strategy.forward_context():
                    strategy.backward(strategy.model(input_ids=ids).logits.float().mean())
                held = strategy.local_state_bytes()
                held["params"] += scales
                most = {k: max(most[k], held[k]) for k in most} if step else most
            strategy.step()
        out[name] = {**most, "optimizer": strategy.local_state_bytes()["optimizer"]}
        strategy.teardown()
    return out


def quant_state_bytes(model: torch.nn.Module) -> int:
    """bitsandbytes' block scales and code tables of the 4-bit weights: device memory that is no parameter,
    so `local_state_bytes()` leaves it out."""
    from strategies.base import tensor_bytes

    states = {
        id(q): q for m in model.modules() if (q := getattr(getattr(m, "weight", None), "quant_state", None))
    }
    nested = [t for q in states.values() if q.nested for t in (q.offset, q.state2.absmax, q.state2.code)]
    return tensor_bytes([t for q in states.values() for t in (q.absmax, q.code)] + nested)


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory) -> Path:
    from training.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("odd-llama"), **ODD)


# Every strategy, full and LoRA in fp32 (the CPU's compute dtype); some in bf16 compute; QLoRA's 4-bit base.
MEASURED = sorted(
    {(s, ft, "fp32") for s in STRATEGIES for ft in ("full", "lora")}
    | {
        ("zero1", "full", "bf16"),
        ("zero3", "full", "bf16"),
        ("fsdp", "lora", "bf16"),
        ("zero2", "lora", "bf16"),
    }
    | {("single", "qlora", "bf16"), ("ddp", "qlora", "bf16")}
)


@pytest.fixture(scope="module")
def two_rank_bytes(odd_model, tmp_path_factory) -> tuple[dict, dict]:
    """(plans, what each rank held): one spawn of 2 gloo ranks runs every measured job."""
    from training.tiny import build_tiny_llama

    even_model = build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama")
    )  # bitsandbytes quantises even sizes only
    plans = {}
    for strategy, finetune, dtype in MEASURED:
        ranks = 1 if strategy == "single" else 2
        spec = job(
            even_model if finetune == "qlora" else odd_model,
            model={"dtype": dtype},
            finetune={"type": finetune, "r": 3},
            strategy={"name": strategy},
            resources={"gpus_per_node": ranks},
            train={"global_batch_size": 2 * ranks},
        )
        plans[f"{strategy}-{finetune}-{dtype}"] = build_plan(spec, Path("unused"), device="cpu")[0]
    return plans, dist_harness.unwrap(dist_harness.run(measure, 2, plans))


@pytest.mark.parametrize("name", ["-".join(j) for j in MEASURED])
def test_predicted_state_is_what_ranks_hold(two_rank_bytes, name):
    plans, held = two_rank_bytes
    plan = plans[name]
    predicted = {k: plan.chosen["bytes_per_rank"][k] for k in ("params", "grads", "optimizer")}
    assert held[0][name] == predicted
    counts, setting = count_parameters(plan.spec), plan_setting(plan)
    for rank in range(plan.world_size):  # FSDP2's rank 1 holds fewer rows of the odd-sized tensors
        want = footprint(plan.strategy).state(counts, replace(setting, rank=rank))
        assert held[rank][name] == {k: want[k] for k in predicted}, f"rank {rank}"


def plan_setting(plan: Plan) -> Setting:
    from launcher.candidates import setting_for

    return setting_for(
        plan.spec, plan.strategy, plan.offload, plan.world_size, plan.device, plan.compute_dtype,
        plan.micro_batch_size, plan.grad_accum,
    )  # fmt: skip
