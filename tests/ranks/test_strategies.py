"""Every strategy trains the same job to the same numbers: 1 rank vs 2 real gloo ranks, full and LoRA.

Three spawns share the work (process start-up dominates on 2 cores): one rank (references, a 1-rank
FSDP checkpoint), two ranks (every strategy, resumes, cross-world-size loads), one rank again (loading
the 2-rank FSDP checkpoint). The tests below only compare the numbers those runs returned.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from support import dist_harness, strategy_model
from support.strategy_model import build_model

# The fixtures these tests share with others, declared here: pytest finds a test's fixtures in its
# module and in conftest.py.
tiny_model_dir = strategy_model.tiny_model_dir


STEPS = 4
GLOBAL_BATCH = 4  # sequences per optimizer step, split over ranks x micro-steps
SEQ_LEN = 24
LR = 2e-3
MAX_GRAD_NORM = 0.25  # below the tiny model's grad norms (full ~1.7, LoRA ~0.3): clipping is exercised
RTOL = 1e-4


@dataclass(frozen=True)
class Job:
    strategy: str
    finetune: str = "full"  # full | lora
    gas: int = 2  # micro-steps per optimizer step on each rank
    compute_dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)  # extra StrategyOptions fields
    first_step: int = 0
    stop_step: int = STEPS
    load_from: str | None = None  # checkpoint to load before first_step
    save_at: int | None = None  # save after this many steps, then reload into a fresh strategy
    save_to: str | None = None
    gather: bool = False  # return full_state_dict() and trainable-only full_state_dict()
    use_accumulate: bool = True  # False: a loop that forgets strategy.accumulate()


# -- what runs on each rank --------------------------------------------------------------------------
def step_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: the same random tokens every step (so the loss falls) with a different
    ~30% of the labels masked each step (so label counts differ between ranks and steps)."""
    input_ids = torch.randint(
        3, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1000)
    )
    gen = torch.Generator().manual_seed(2000 + step)
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100
    return input_ids, labels


def make_strategy(job: Job, env, model_dir: str):
    from strategies import create_strategy
    from strategies.base import StrategyOptions

    options = StrategyOptions(
        compute_dtype=job.compute_dtype,
        micro_batch_size=GLOBAL_BATCH // (env.world_size * job.gas),
        gradient_accumulation_steps=job.gas,
        max_grad_norm=MAX_GRAD_NORM,
        **job.options,
    )
    strategy = create_strategy(job.strategy, options, env)
    strategy.setup(
        build_model(model_dir, job.finetune),
        lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3)),
    )
    return strategy


def train_steps(strategy, env, job: Job, first: int, stop: int, out: dict) -> None:
    """The loop's contract: loss = token CE sum of this micro-batch * world / global label tokens."""
    vocab = strategy.unwrap().config.vocab_size
    per_rank = GLOBAL_BATCH // env.world_size
    micro = per_rank // job.gas
    for step in range(first, stop):
        input_ids, labels = step_batch(step, vocab)
        global_tokens = int((labels[:, 1:] != -100).sum())
        rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        input_ids, labels = input_ids[rows], labels[rows]
        step_loss = torch.zeros(())
        for m in range(job.gas):
            ids, lab = input_ids[m * micro : (m + 1) * micro], labels[m * micro : (m + 1) * micro]
            accumulate = (
                strategy.accumulate(m == job.gas - 1) if job.use_accumulate else contextlib.nullcontext()
            )
            with accumulate, strategy.forward_context():
                logits = strategy.model(input_ids=ids).logits.float()
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), reduction="sum"
                )
                loss = ce * env.world_size / global_tokens
                strategy.backward(loss)
            step_loss += loss.detach()
        if step == first:  # between backward and step: gradients are live
            out["bytes_with_grads"] = strategy.local_state_bytes()
        out["grad_norms"].append(float(strategy.step()))
        out["losses"].append(float(strategy.all_reduce_sum(step_loss)) / env.world_size)
        out["lrs"].append(strategy.current_lr())


def run_job(env, job: Job, model_dir: str) -> dict:
    out: dict = {"losses": [], "grad_norms": [], "lrs": []}
    strategy = make_strategy(job, env, model_dir)
    if job.load_from:
        strategy.load_checkpoint(Path(job.load_from))
    if job.save_at is not None:
        train_steps(strategy, env, job, job.first_step, job.save_at, out)
        strategy.save_checkpoint(Path(job.save_to))
        strategy.teardown()
        strategy = make_strategy(job, env, model_dir)  # a fresh model and engine, as after a restart
        strategy.load_checkpoint(Path(job.save_to))
        train_steps(strategy, env, job, job.save_at, job.stop_step, out)
    else:
        train_steps(strategy, env, job, job.first_step, job.stop_step, out)
    out["bytes"] = strategy.local_state_bytes()
    if job.gather:
        out["state_dict"] = strategy.full_state_dict()
        out["trainable_state_dict"] = strategy.full_state_dict(trainable_only=True)
    strategy.teardown()
    return out


def run_jobs(env, jobs: dict[str, Job], model_dir: str) -> dict:
    """All jobs in one process group; a failing job is reported as that job's error."""
    return dist_harness.run_each(env, jobs, lambda env, job: run_job(env, job, model_dir))


# -- the three spawns --------------------------------------------------------------------------------
TWO_RANK_STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
RESUMED = ("ddp-full", "fsdp-full", "fsdp-lora", "zero3-full", "zero3-lora")
# Options that must not change the numbers (fp32 on CPU): offload, activation checkpointing, resharding.
VARIANTS = {
    "fsdp-offload": Job("fsdp", options={"offload_params": True}),
    "fsdp-keep-gathered": Job("fsdp", options={"reshard_after_forward": False}),
    "zero2-offload": Job("zero2", options={"offload_optimizer": True}),
    "zero3-offload": Job("zero3", options={"offload_params": True, "offload_optimizer": True}),
    "ddp-checkpointing": Job("ddp", options={"gradient_checkpointing": "full"}),
    "fsdp-checkpointing": Job("fsdp", options={"gradient_checkpointing": "full"}),
    "zero3-checkpointing": Job("zero3", options={"gradient_checkpointing": "full"}),
    "fsdp-selective-checkpointing": Job("fsdp", options={"gradient_checkpointing": "selective"}),
    "zero3-selective-checkpointing": Job("zero3", options={"gradient_checkpointing": "selective"}),
}
BF16 = ("ddp", "fsdp", "zero2", "zero3")


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def spawn(world_size: int, jobs: dict[str, Job], model_dir: str) -> list[dict]:
    """Each rank's results; rank 0's hold the gathered state dicts."""
    # ~35 jobs in the two-rank spawn: 75 s on a quiet 2-core machine, several times that on a loaded one
    return dist_harness.unwrap(dist_harness.run(run_jobs, world_size, jobs, model_dir, timeout=900))


@pytest.fixture(scope="session")
def one_rank(tiny_model_dir, checkpoint_root) -> list[dict]:
    jobs = {
        "single-full": Job("single", gas=4, gather=True),
        "single-lora": Job("single", "lora", gas=4, gather=True),
        "fsdp-save-1rank": Job("fsdp", gas=4, save_at=2, save_to=str(checkpoint_root / "fsdp-1rank")),
    }
    return spawn(1, jobs, tiny_model_dir)


@pytest.fixture(scope="session")
def two_ranks(tiny_model_dir, checkpoint_root, one_rank) -> list[dict]:
    jobs = {f"{s}-{ft}": Job(s, ft, gather=True) for s in TWO_RANK_STRATEGIES for ft in ("full", "lora")}
    for name in RESUMED:
        jobs[f"{name}-resume"] = replace(
            jobs[name], gather=False, save_at=2, save_to=str(checkpoint_root / name)
        )
    jobs["fsdp-from-1rank"] = Job("fsdp", first_step=2, load_from=str(checkpoint_root / "fsdp-1rank"))
    jobs.update(VARIANTS)
    jobs.update({f"{s}-bf16": Job(s, compute_dtype=torch.bfloat16) for s in BF16})
    return spawn(2, jobs, tiny_model_dir)


@pytest.fixture(scope="session")
def one_rank_after(tiny_model_dir, checkpoint_root, two_ranks) -> list[dict]:
    two_rank_fsdp = str(checkpoint_root / "fsdp-full")
    jobs = {
        "fsdp-from-2ranks": Job("fsdp", gas=4, first_step=2, load_from=two_rank_fsdp),
        "single-from-2rank-fsdp": Job("single", gas=4, first_step=2, load_from=two_rank_fsdp),
        "zero3-from-2ranks": Job("zero3", gas=4, first_step=2, load_from=str(checkpoint_root / "zero3-full")),
        "zero2-without-accumulate": Job("zero2", gas=4, use_accumulate=False),
    }
    return spawn(1, jobs, tiny_model_dir)


result = dist_harness.job_result


# -- the tests (multi-process: they read the spawned runs' results) ----------------------------------


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("strategy", TWO_RANK_STRATEGIES)
def test_two_ranks_match_single(one_rank, two_ranks, strategy, finetune):
    ref = result(one_rank, f"single-{finetune}")
    got = result(two_ranks, f"{strategy}-{finetune}")
    assert ref["losses"][-1] < ref["losses"][0]  # it learns, so equal losses mean equal updates
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=RTOL)
    assert min(ref["grad_norms"]) > MAX_GRAD_NORM  # every step took the clipping path
    assert got["lrs"] == pytest.approx(ref["lrs"], rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_options_keep_the_numbers(one_rank, two_ranks, variant):
    ref = result(one_rank, "single-full")
    got = result(two_ranks, variant)
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=RTOL)


@pytest.mark.parametrize("strategy", BF16)
def test_bf16_compute_keeps_fp32_master_weights(one_rank, two_ranks, strategy):
    ref, got = result(one_rank, "single-full"), result(two_ranks, f"{strategy}-bf16")
    assert got["losses"] == pytest.approx(ref["losses"], rel=2e-3)
    assert got["losses"] != pytest.approx(ref["losses"], rel=1e-7, abs=0)  # bf16 really ran
    fp32_bytes = result(two_ranks, "ddp-full")["bytes"]
    # AdamW state and master weights stay fp32 in every strategy: the same bytes as without bf16.
    assert got["bytes"]["optimizer"] == result(two_ranks, f"{strategy}-full")["bytes"]["optimizer"]
    # Module params: fp32 under autocast (ddp) and FSDP2's policy; DeepSpeed holds bf16 copies.
    expected_params = {"ddp": 1.0, "fsdp": 0.5, "zero2": 0.5, "zero3": 0.25}[strategy]
    assert got["bytes"]["params"] / fp32_bytes["params"] == pytest.approx(expected_params, abs=0.01)


@pytest.mark.parametrize("name", RESUMED)
def test_resume_matches_uninterrupted(two_ranks, name):
    straight, resumed = result(two_ranks, name), result(two_ranks, f"{name}-resume")
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6)
    assert resumed["lrs"] == pytest.approx(straight["lrs"], rel=1e-12)  # the scheduler came back too


def test_fsdp_checkpoint_moves_between_world_sizes(one_rank, two_ranks, one_rank_after):
    ref = result(one_rank, "single-full")["losses"]
    assert result(two_ranks, "fsdp-from-1rank")["losses"] == pytest.approx(ref[2:], rel=RTOL)  # 1 -> 2
    assert result(one_rank_after, "fsdp-from-2ranks")["losses"] == pytest.approx(ref[2:], rel=RTOL)  # 2 -> 1
    # single and ddp write the same DCP format, so they load an FSDP checkpoint too.
    assert result(one_rank_after, "single-from-2rank-fsdp")["losses"] == pytest.approx(ref[2:], rel=RTOL)


def test_deepspeed_checkpoint_moves_between_world_sizes(one_rank, one_rank_after):
    """A ZeRO-3 checkpoint of 2 ranks resumes on 1 through DeepSpeed's universal checkpoint."""
    ref = result(one_rank, "single-full")["losses"]
    assert result(one_rank_after, "zero3-from-2ranks")["losses"] == pytest.approx(ref[2:], rel=RTOL)


def test_deepspeed_step_needs_the_accumulation_boundary(one_rank_after):
    error = one_rank_after[0]["zero2-without-accumulate"]
    assert isinstance(error, dist_harness.RankError)
    assert "wrap each micro-step in strategy.accumulate" in error.text


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("strategy", TWO_RANK_STRATEGIES)
def test_full_state_dict_matches_single(tiny_model_dir, one_rank, two_ranks, strategy, finetune):
    ref, got = result(one_rank, f"single-{finetune}"), result(two_ranks, f"{strategy}-{finetune}")
    for key in ("state_dict", "trainable_state_dict"):
        expected, actual = ref[key], got[key]
        assert list(actual) == list(expected)
        for name, tensor in actual.items():
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert result(two_ranks, f"{strategy}-{finetune}", rank=1)["state_dict"] is None
    if finetune == "lora":
        assert got["trainable_state_dict"] and all("lora_" in k for k in got["trainable_state_dict"])
    # Every trainable tensor moved: equal dicts are not two copies of the initial model.
    initial = build_model(tiny_model_dir, finetune).state_dict()
    assert not any(torch.equal(initial[k], v) for k, v in got["trainable_state_dict"].items())


@pytest.mark.parametrize("strategy", TWO_RANK_STRATEGIES)
def test_local_state_bytes_are_this_ranks_shards(two_ranks, strategy):
    """Fractions of DDP's fp32 param bytes P (AdamW: master + 2 moments = 3 fp32 copies, 2P for ddp)."""
    replica = result(two_ranks, "ddp-full")["bytes_with_grads"]["params"]
    expected = {  # (params, grads after the last backward, optimizer after a step) / P
        "ddp": (1.0, 1.0, 2.0),
        "fsdp": (0.5, 0.5, 1.0),
        "zero1": (1.0, 0.5, 1.5),
        "zero2": (1.0, 0.5, 1.5),
        "zero3": (0.5, 0.5, 1.5),
    }[strategy]
    for rank in (0, 1):
        got = result(two_ranks, f"{strategy}-full", rank)
        measured = (
            got["bytes_with_grads"]["params"] / replica,
            got["bytes_with_grads"]["grads"] / replica,
            got["bytes"]["optimizer"] / replica,
        )
        assert measured == pytest.approx(expected, abs=0.01), f"rank {rank}"
