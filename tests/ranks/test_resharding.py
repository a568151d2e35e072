"""A DeepSpeed checkpoint resumes on another world size (2 -> 1 and 1 -> 2 ranks) through DeepSpeed's
universal checkpoint, converted automatically on load, and training continues as if uninterrupted.

Three spawns (process start-up dominates on 2 cores): two ranks train 4 steps, saving after step 2
(the uninterrupted references); one rank resumes those checkpoints, and trains 4 steps saving its own;
two ranks resume the one-rank checkpoints. Every run sees the same global batch at each step, split
over its ranks, so a resumed run must reproduce the two-rank run's losses after the save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support import dist_harness

STEPS, SAVE_AT = 4, 2
GLOBAL_BATCH, GAS, SEQ_LEN = 4, 2, 24  # sequences per step, micro-steps per step on every world size
LR, MAX_GRAD_NORM = 2e-3, 0.25
CASES = ("zero3-full", "zero2-full", "zero3-lora", "zero2-lora")


@dataclass(frozen=True)
class Job:
    case: str  # "<strategy>-<finetune>"
    strategy: str | None = None  # load with another strategy than the case's
    load_from: str | None = None  # resume this checkpoint at step SAVE_AT
    save_to: str | None = None  # train from step 0 and save after SAVE_AT steps

    @property
    def finetune(self) -> str:
        return self.case.split("-")[1]


# -- what runs on each rank --------------------------------------------------------------------------
def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s batch: fixed tokens (so the loss falls), a different ~30% of labels masked each step."""
    input_ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(100 + step)) < 0.3] = -100
    return input_ids, labels


def make_strategy(job: Job, env, model_dir: str):
    from transformers import AutoModelForCausalLM

    from strategies import create_strategy
    from strategies.base import StrategyOptions

    torch.manual_seed(0)  # LoRA's random A matrices: the same in every run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if job.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        )
    options = StrategyOptions(
        micro_batch_size=GLOBAL_BATCH // (env.world_size * GAS),
        gradient_accumulation_steps=GAS,
        max_grad_norm=MAX_GRAD_NORM,
    )
    strategy = create_strategy(job.strategy or job.case.split("-")[0], options, env)
    strategy.setup(
        model,
        lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * (1 - s / 10)),
    )
    return strategy


def train(strategy, env, first: int, stop: int, out: dict) -> None:
    """The loop's loss contract: token CE sum * world size / the global step's label tokens."""
    vocab = strategy.unwrap().config.vocab_size
    per_rank, micro = GLOBAL_BATCH // env.world_size, GLOBAL_BATCH // (env.world_size * GAS)
    for step in range(first, stop):
        input_ids, labels = global_batch(step, vocab)
        global_tokens = int((labels[:, 1:] != -100).sum())
        mine = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
        input_ids, labels = input_ids[mine], labels[mine]
        step_loss = torch.zeros(())
        for m in range(GAS):
            ids, lab = input_ids[m * micro : (m + 1) * micro], labels[m * micro : (m + 1) * micro]
            with strategy.accumulate(m == GAS - 1):
                logits = strategy.model(input_ids=ids).logits.float()
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), reduction="sum"
                )
                loss = ce * env.world_size / global_tokens
                strategy.backward(loss)
            step_loss += loss.detach()
        strategy.step()
        out["losses"].append(float(strategy.all_reduce_sum(step_loss)) / env.world_size)
        out["lrs"].append(strategy.current_lr())


def run_job(env, job: Job, model_dir: str) -> dict:
    out: dict = {"losses": [], "lrs": []}
    strategy = make_strategy(job, env, model_dir)
    try:
        if job.load_from:
            strategy.load_checkpoint(Path(job.load_from))
            out["loaded_step"] = strategy.engine.global_steps
            out["loaded_lr"] = strategy.current_lr()
            out["loaded_state"] = strategy.full_state_dict()
            train(strategy, env, SAVE_AT, STEPS, out)
        else:
            train(strategy, env, 0, SAVE_AT, out)
            strategy.save_checkpoint(Path(job.save_to))
            out["saved_state"] = strategy.full_state_dict()
            train(strategy, env, SAVE_AT, STEPS, out)
    finally:
        strategy.teardown()
    return out


def run_jobs(env, jobs: dict[str, Job], model_dir: str) -> dict:
    """All jobs in one process group; a failing job is reported as that job's error."""
    return dist_harness.run_each(env, jobs, lambda env, job: run_job(env, job, model_dir))


# -- the three spawns --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from training.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def spawn(world_size: int, jobs: dict[str, Job], model_dir: str) -> list[dict]:
    return dist_harness.unwrap(dist_harness.run(run_jobs, world_size, jobs, model_dir))


@pytest.fixture(scope="module")
def two_ranks(model_dir, ckpt) -> list[dict]:
    return spawn(2, {c: Job(c, save_to=str(ckpt / f"{c}-2ranks")) for c in CASES}, model_dir)


@pytest.fixture(scope="module")
def one_rank(model_dir, ckpt, two_ranks) -> list[dict]:
    jobs = {f"{c}-from-2ranks": Job(c, load_from=str(ckpt / f"{c}-2ranks")) for c in CASES}
    jobs.update({c: Job(c, save_to=str(ckpt / f"{c}-1rank")) for c in CASES})
    jobs["zero3-into-zero2"] = Job("zero3-full", strategy="zero2", load_from=str(ckpt / "zero3-full-2ranks"))
    jobs["zero2-into-zero1"] = Job("zero2-full", strategy="zero1", load_from=str(ckpt / "zero2-full-2ranks"))
    return spawn(1, jobs, model_dir)


@pytest.fixture(scope="module")
def two_ranks_after(model_dir, ckpt, one_rank) -> list[dict]:
    return spawn(2, {f"{c}-from-1rank": Job(c, load_from=str(ckpt / f"{c}-1rank")) for c in CASES}, model_dir)


def result(results: list[dict], name: str, rank: int = 0) -> dict:
    value = results[rank][name]
    if isinstance(value, dist_harness.RankError):
        pytest.fail(repr(value), pytrace=False)
    return value


def assert_resumed_like_uninterrupted(resumed: dict, straight: dict, saver: dict) -> None:
    assert straight["losses"][-1] < straight["losses"][0]  # it learns: equal losses mean equal updates
    assert resumed["loaded_step"] == SAVE_AT
    assert resumed["loaded_lr"] == pytest.approx(straight["lrs"][SAVE_AT - 1], rel=1e-12)
    assert resumed["lrs"] == pytest.approx(straight["lrs"][SAVE_AT:], rel=1e-12)  # the schedule continues
    assert resumed["losses"] == pytest.approx(straight["losses"][SAVE_AT:], rel=1e-5)
    saved, loaded = saver["saved_state"], resumed["loaded_state"]
    assert list(loaded) == list(saved)
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=1e-6, msg=name)


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, one_rank, ckpt, case):
    straight = result(two_ranks, case)
    assert_resumed_like_uninterrupted(result(one_rank, f"{case}-from-2ranks"), straight, straight)
    universal = ckpt / f"{case}-2ranks" / "universal"
    assert (universal / "deepspeed" / "zero").is_dir()  # converted once, next to the checkpoint
    assert not (ckpt / f"{case}-2ranks" / "universal.tmp").exists()


@pytest.mark.parametrize("case", CASES)
def test_one_rank_checkpoint_resumes_on_two_ranks(two_ranks, one_rank, two_ranks_after, case):
    resumed = result(two_ranks_after, f"{case}-from-1rank")
    assert_resumed_like_uninterrupted(resumed, result(two_ranks, case), result(one_rank, case))
    assert result(two_ranks_after, f"{case}-from-1rank", rank=1)["losses"] == resumed["losses"]


def test_lora_checkpoints_hold_only_the_adapter(two_ranks, ckpt):
    """exclude_frozen_parameters: the universal folders are the adapter's params, not the base model's."""
    params = {
        p.name
        for p in (ckpt / "zero3-lora-2ranks" / "universal" / "deepspeed" / "zero").iterdir()
        if p.is_dir()
    }
    assert params and all("lora_" in name for name in params)


def test_zero1_resumes_a_zero2_checkpoint_of_another_world_size(two_ranks, one_rank):
    straight = result(two_ranks, "zero2-full")
    assert_resumed_like_uninterrupted(result(one_rank, "zero2-into-zero1"), straight, straight)


def test_zero3_checkpoint_is_refused_under_another_stage(one_rank):
    error = one_rank[0]["zero3-into-zero2"]
    assert isinstance(error, dist_harness.RankError)
    assert "was written by zero3 on 2 ranks; this run is zero2 on 1 ranks" in error.text
    assert "resume with strategy.name: zero3" in error.text
