"""Every model family sharpen trains, proven on its tiny local copy (training/tiny.py): full and LoRA under
single, fsdp and zero3 give the same losses; the trained weights, gathered into final/ and read back from a
checkpoint as `sharpen export` reads it, reload with transformers (or PEFT) and reproduce the trained logits.

What runs on the ranks is what the worker runs: the model loaded with the job's attention (sdpa, per sample
on packed rows), the kernel levers `training.kernels.apply` installs for that family and strategy, the
real causal_lm loss (with an MoE model's router load-balancing loss) on padding-free micro-batches of
several samples, and the strategy's own accumulate/backward/step. Two spawns hold the whole matrix (process
start-up dominates on 2 cores): one rank (single), two ranks (fsdp, zero3). The tests compare the numbers
those spawns returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support import dist_harness

from training.tiny import FAMILIES, MOE_FAMILIES

STEPS = 3
SAMPLES_PER_STEP = 4  # 1 rank: 2 micro-steps of 2 samples; 2 ranks: 1 micro-step of 2 samples each
LR = 3e-3
RTOL = 1e-4
LORA_DENSE = "all-linear"
LORA_MOE = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]  # the experts' 3D weights too
STRATEGIES = ("single", "fsdp", "zero3")
IDLE = "mixtral-idle"  # a Mixtral of 8 experts, 1 active: micro-batches of 3 tokens leave most idle


@dataclass(frozen=True)
class Job:
    family: str
    strategy: str
    finetune: str  # full | lora
    save_to: str | None = None  # a checkpoint written after the last step (what sharpen export reads)
    final_to: str | None = None  # final/ as the worker writes it
    samples: tuple[int, int] = (5, 21)  # sample lengths drawn from [low, high)


# -- what runs on each rank --------------------------------------------------------------------------
def step_samples(step: int, vocab: int, lengths: tuple[int, int]) -> list[dict]:
    """The step's samples: random tokens (the same every step, so the loss falls), labels shifted with a
    different ~30% masked each step. Each sample is a row of the collator's input."""
    gen = torch.Generator().manual_seed(100)
    mask_gen = torch.Generator().manual_seed(200 + step)
    rows = []
    for _ in range(SAMPLES_PER_STEP):
        n = int(torch.randint(lengths[0], lengths[1], (1,), generator=gen))
        ids = torch.randint(10, vocab, (n,), generator=gen)
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        labels[torch.rand(n, generator=mask_gen) < 0.3] = -100
        labels[0] = ids[1]  # at least one label in every sample
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "segment_lengths": [n]})
    return rows


def probe_ids(vocab: int) -> torch.Tensor:
    return (torch.arange(3, 27) * 7 % (vocab - 3) + 3).unsqueeze(0)


def load(model_dir: str, finetune: str):
    from transformers import AutoModelForCausalLM

    from training.kernels.attention import kernel_name
    from training.moe import lora_targets

    torch.manual_seed(0)  # LoRA A matrices are random: the same on every rank and strategy
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=kernel_name("sdpa"))
    model.config.use_cache = False
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        moe = hasattr(model.config, "output_router_logits")
        modules, parameters = lora_targets(model, LORA_MOE if moe else LORA_DENSE)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules, target_parameters=parameters or None)
        model = get_peft_model(model, config)
    return model.train()


def expert_load(model) -> dict[str, list[list[int]]]:
    """Hooks counting, per router and forward, the tokens each expert receives: name -> [counts of each
    forward] (filled as the model runs)."""
    counts: dict[str, list[list[int]]] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            counts[name] = []

            def hook(module, args, output, name=name):
                counts[name].append(torch.bincount(output[2].flatten(), minlength=module.num_experts).tolist())

            module.register_forward_hook(hook)
    return counts


def run_job(env, job: Job, model_dirs: dict[str, str]) -> dict:
    from strategies import create_strategy
    from strategies.base import StrategyOptions
    from training import kernels
    from training.data.packing import collate
    from training.forward import run_forward
    from training.kernels.attention import collate_attention
    from training.methods.causal_lm import CausalLMLoss

    model_dir = model_dirs[job.family]
    gas = 2 // env.world_size
    options = StrategyOptions(
        compute_dtype=torch.float32, micro_batch_size=1, gradient_accumulation_steps=gas, max_grad_norm=1.0
    )
    strategy = create_strategy(job.strategy, options, env)
    model = load(model_dir, job.finetune)
    counts = expert_load(model)
    levers = kernels.apply(model, strategy, compiled=False)
    strategy.setup(
        model,
        lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    )
    loss_fn = CausalLMLoss()
    vocab = strategy.unwrap().config.vocab_size
    attention = collate_attention("sdpa", "cpu")
    out: dict = {"losses": [], "aux": [], "levers": levers}
    per_rank = SAMPLES_PER_STEP // env.world_size
    for step in range(STEPS):
        rows = step_samples(step, vocab, job.samples)
        global_labels = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
        mine = rows[env.rank * per_rank : (env.rank + 1) * per_rank]
        step_loss, step_aux = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for m in range(gas):
            micro = collate(mine[m * 2 : (m + 1) * 2], padding_free=True, attention=attention)
            with strategy.accumulate(m == gas - 1):
                result = run_forward(strategy, loss_fn, micro)
                strategy.backward(result.loss_sum * (env.world_size / global_labels))
            step_loss += result.loss_sum.detach().double()
            if "router_aux_loss" in result.metric_sums:
                step_aux += result.metric_sums["router_aux_loss"].double()
        strategy.step()
        out["losses"].append(float(strategy.all_reduce_sum(step_loss)) / global_labels)
        out["aux"].append(float(strategy.all_reduce_sum(step_aux)) / global_labels)
    out["expert_tokens"] = {name: list(forwards) for name, forwards in counts.items()}  # training's only
    out["fsdp_units"] = fsdp_units(strategy.model)
    out["probe_logits"] = probe_logits(strategy, vocab)
    if job.save_to:
        strategy.save_checkpoint(Path(job.save_to))
    if job.final_to:
        from transformers import AutoTokenizer

        from training.export import write_final

        write_final(strategy, AutoTokenizer.from_pretrained(model_dir), Path(job.final_to), job.finetune == "lora")
    strategy.teardown()
    return out


def fsdp_units(model) -> list[str]:
    """Class names of the modules FSDP2 sharded as one unit (empty for other strategies)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    # fully_shard makes each a subclass named FSDP<its class>
    return sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)})


def probe_logits(strategy, vocab: int) -> torch.Tensor:
    """The trained model's logits on a fixed input (a collective under fsdp and zero3)."""
    model = strategy.model
    model.eval()
    with torch.no_grad(), strategy.forward_context():
        logits = model(input_ids=probe_ids(vocab).to(strategy.env.device), use_cache=False).logits.float().cpu()
    model.train()
    return logits


def run_jobs(env, jobs: dict[str, Job], model_dirs: dict[str, str]) -> dict:
    return dist_harness.run_each(env, jobs, lambda env, job: run_job(env, job, model_dirs))


# -- the fixtures: models, and the two spawns ---------------------------------------------------------
@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from training.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    dirs = {family: str(build_tiny_model(root / family, family, vocab_size=320)) for family in FAMILIES}
    dirs[IDLE] = str(build_tiny_model(root / IDLE, "mixtral", vocab_size=320, num_local_experts=8, num_experts_per_tok=1))
    return dirs


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("family-checkpoints")


def jobs_for(strategies: tuple[str, ...], saved: Path) -> dict[str, Job]:
    jobs = {}
    for family in FAMILIES:
        for strategy in strategies:
            for finetune in ("full", "lora"):
                name = f"{family}-{strategy}-{finetune}"
                keep = strategy != "single"
                jobs[name] = Job(
                    family,
                    strategy,
                    finetune,
                    save_to=str(saved / name / "checkpoint") if keep else None,
                    final_to=str(saved / name / "final") if keep else None,
                )
    for strategy in strategies:  # three tokens a micro-step on 8 experts, one each: most get none
        jobs[f"{IDLE}-{strategy}-full"] = Job(IDLE, strategy, "full", samples=(3, 4))
    return jobs


def spawn(world_size: int, jobs: dict[str, Job], model_dirs: dict[str, str]) -> list[dict]:
    return dist_harness.unwrap(dist_harness.run(run_jobs, world_size, jobs, model_dirs, timeout=900))


@pytest.fixture(scope="session")
def one_rank(model_dirs, saved) -> list[dict]:
    return spawn(1, jobs_for(("single",), saved), model_dirs)


@pytest.fixture(scope="session")
def two_ranks(model_dirs, saved, one_rank) -> list[dict]:
    return spawn(2, jobs_for(("fsdp", "zero3"), saved), model_dirs)


result = dist_harness.job_result


# -- the tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_strategies_agree(one_rank, two_ranks, family, strategy, finetune):
    ref = result(one_rank, f"{family}-single-{finetune}")
    got = result(two_ranks, f"{family}-{strategy}-{finetune}")
    assert ref["losses"][-1] < ref["losses"][0]  # it learns: equal losses mean equal updates
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    if family in MOE_FAMILIES:  # the router's load-balancing loss is computed, and the same
        assert min(ref["aux"]) > 0.5
        assert got["aux"] == pytest.approx(ref["aux"], rel=RTOL)
    else:
        assert ref["aux"] == [0.0] * STEPS
    torch.testing.assert_close(got["probe_logits"], ref["probe_logits"], rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_final_and_export_reproduce_the_trained_logits(model_dirs, saved, two_ranks, family, strategy, finetune):
    """final/ (gathered by write_final) and the checkpoint (read offline as `sharpen export` reads it) each
    reload with transformers, PEFT for an adapter, and give the logits the trained model gave."""
    from transformers import AutoModelForCausalLM

    from strategies.full_weights import load_full_weights

    name = f"{family}-{strategy}-{finetune}"
    trained = result(two_ranks, name)["probe_logits"]
    base = model_dirs[family]
    ids = probe_ids(trained.shape[-1])
    final = saved / name / "final"

    def logits_of(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids, use_cache=False).logits.float()

    if finetune == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), final)
    torch.testing.assert_close(logits_of(reloaded), trained, rtol=RTOL, atol=RTOL)
    if reloaded.config.tie_word_embeddings and finetune == "full":  # tied in the file as in the model
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight

    exported = load(base, finetune)  # export's model: the base as trained, filled from the checkpoint
    load_full_weights(exported, saved / name / "checkpoint", finetune == "lora")
    torch.testing.assert_close(logits_of(exported), trained, rtol=RTOL, atol=RTOL)
    if finetune == "lora":  # --merge-lora: the adapter folded into the weights
        torch.testing.assert_close(logits_of(exported.merge_and_unload()), trained, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fsdp_shards_each_decoder_layer_with_its_experts(two_ranks, family):
    units = result(two_ranks, f"{family}-fsdp-full")["fsdp_units"]
    layer = {"mixtral": "MixtralDecoderLayer", "qwen3_moe": "Qwen3MoeDecoderLayer", "olmoe": "OlmoeDecoderLayer"}
    root = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
    assert units == sorted([layer[family], root[family]])  # no expert or MoE block is a unit of its own


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_step_where_experts_get_no_tokens(one_rank, two_ranks, strategy):
    """Three tokens a micro-step over 8 experts, one active: on each rank most experts get none, and an
    expert one rank feeds is idle on the other. ZeRO-3 (MoE blocks as leaf modules) does not hang, and
    the losses equal one rank's."""
    ref = result(one_rank, f"{IDLE}-single-full")
    got = [result(two_ranks, f"{IDLE}-{strategy}-full", rank) for rank in (0, 1)]
    assert got[0]["losses"] == pytest.approx(ref["losses"], rel=RTOL)
    for router, forwards in got[0]["expert_tokens"].items():
        others = got[1]["expert_tokens"][router]
        assert len(forwards) == len(others) == STEPS  # one micro-step a step on each rank
        for mine, other in zip(forwards, others, strict=True):
            assert sum(mine) == sum(other) == 2 * 3  # two samples of three tokens, one expert each
            assert 0 in mine and 0 in other
        # and an expert idle on one rank is fed on the other, in the same forward
        assert any((a == 0) != (b == 0) for f, g in zip(forwards, others, strict=True) for a, b in zip(f, g, strict=True))


def test_kernel_levers_per_family(one_rank, two_ranks):
    """Which levers each family took on one rank (fused loss for LoRA where the head's code is Llama's,
    the last layer pruned where the decoder layer's is, LoRA linears fused), and none under zero3 (its
    hooks gather weights the levers read directly)."""
    for family in FAMILIES:
        for finetune in ("full", "lora"):
            assert result(two_ranks, f"{family}-zero3-{finetune}")["levers"] == []
    assert "fused_loss" in result(one_rank, "llama-single-lora")["levers"]
    assert "last_layer" in result(one_rank, "llama-single-full")["levers"]
    for family in MOE_FAMILIES:  # pruning the last layer's MoE would change its router's aux loss
        assert "last_layer" not in result(one_rank, f"{family}-single-full")["levers"]
        assert "fused_loss" not in result(one_rank, f"{family}-single-lora")["levers"]
