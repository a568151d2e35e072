"""JobSpec + the facts of this machine or cluster → the Plan: world size, device, strategy, micro batch, memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher import __version__
from launcher.candidates import (
    Candidate,
    estimate,
    generation_gather,
    gpu_capacity,
    rollout,
    setting_for,
    usable_bytes,
)
from launcher.errors import UserError
from launcher.family_rules import check_family
from launcher.moe_rules import layer_problems
from launcher.plan import DEFAULT_STOP_GRACE_S, Plan, collective_timeout_s
from launcher.sequence_rules import kv_heads_note, sequence_problems
from launcher.shapes import (
    all_to_all_bytes,
    count_parameters,
    human_bytes,
    load_config,
    offloaded_activations,
)
from launcher.spec import CHECKPOINTING, JobSpec, mixing, sequence_parallel_rules
from strategies import candidate_order, capabilities
from strategies.footprint.counts import MemoryEstimate, ParamCounts
from strategies.job_rules import job_problems, ranks_problem


def job_hash(spec: JobSpec) -> str:
    """A hash of what decides the trained weights' meaning (model, fine-tune type, method), for resume checks."""
    key = {
        "model": spec.model.path,
        "finetune": spec.finetune.model_dump(),
        "method": spec.method.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def detect_device(requested: str) -> tuple[str, str | None]:
    """('cuda'|'cpu', notice or None). `cuda` without a GPU is a user error, never a silent CPU run."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UserError(
            "device: cuda was requested but no CUDA GPU is visible "
            f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            "run on a GPU machine, or set device: cpu (or auto) to train on the CPU with gloo "
            "(`sharpen plan` plans the job for GPUs without one)",
        )
    if requested == "auto":
        if has_cuda:
            return "cuda", None
        return "cpu", "no CUDA GPU found: training on the CPU with gloo (device: auto)"
    return requested, None


def resolve_dtypes(spec: JobSpec, device: str) -> tuple[str, str]:
    """(compute dtype, storage dtype of frozen weights)."""
    if spec.model.dtype == "auto":
        compute = "bf16" if device == "cuda" else "fp32"
    else:
        compute = spec.model.dtype
    storage = compute
    return compute, storage


def candidate_pairs(spec: JobSpec, world: int) -> list[tuple[str, str]]:
    """(strategy, offload) pairs worth comparing, fastest first; an explicit choice is always among them."""
    pairs = list(candidate_order(world))
    name, offload = spec.strategy.name, spec.strategy.offload
    if name != "auto" and (name, offload) not in pairs:
        pairs.append((name, offload))
    return pairs


def evaluate_candidate(spec: JobSpec, counts: ParamCounts, strategy: str, offload: str, **where) -> Candidate:
    """One candidate at the micro batch it would run: the job's, or with `auto` the largest that fits.
    `where`: world, device, compute (dtype) and usable (GPU bytes, None: unlimited)."""
    world, usable = where["world"], where["usable"]

    data_ranks = world // spec.strategy.sequence_parallel

    def at(mbs: int):
        accum = spec.train.global_batch_size // (mbs * data_ranks)
        return estimate(
            counts, setting_for(spec, strategy, offload, world, where["device"], where["compute"], mbs, accum)
        )

    mbs, accum = resolve_micro_batch(
        spec, data_ranks, None if usable is None else lambda m: at(m)[0].total <= usable
    )
    memory, notes = at(mbs)
    fits = usable is None or memory.total <= usable
    setting = setting_for(spec, strategy, offload, world, where["device"], where["compute"], mbs, accum)
    degree = spec.strategy.sequence_parallel
    return Candidate(strategy, offload, mbs, accum, memory, fits, tuple(notes), degree, all_to_all_bytes(counts, setting))


def sequence_parallel_degrees(spec: JobSpec, config) -> list[int]:
    """The strategy.sequence_parallel degrees above the job's that it may run with, smallest first: divisors of the
    world size that the model (sequence_problems), the rest of the job file (sequence_parallel_rules) and the global
    batch (micro batch x data-parallel groups) allow. None without the model's config."""
    if config is None:
        return []
    world, gbs, mbs = spec.world_size, spec.train.global_batch_size, spec.train.micro_batch_size
    degrees = []
    for degree in range(spec.strategy.sequence_parallel + 1, world + 1):
        if world % degree or gbs % ((mbs if isinstance(mbs, int) else 1) * (world // degree)):
            continue
        variant = spec_with(spec, strategy={"sequence_parallel": degree})
        if not sequence_parallel_rules(variant) and not sequence_problems(variant, config, degree):
            degrees.append(degree)
    return degrees


def choose_strategy(
    spec: JobSpec, candidates: list[Candidate], usable: int | None
) -> tuple[Candidate | None, str]:
    """(candidate, why): the job's own choice, or for `auto` the fastest that fits (None when none does).

    Fastest = first in the registry's candidate order (strategies.CANDIDATES: least communication, then
    offloading to the host)."""
    name, offload = spec.strategy.name, spec.strategy.offload
    if name != "auto":
        return next(
            c for c in candidates if (c.strategy, c.offload) == (name, offload)
        ), "set in the job file"
    allowed = [c for c in candidates if offload == "none" or c.offload == offload]
    if spec.model.compile:  # only those that run torch.compile (the job rules refuse naming another)
        allowed = [c for c in allowed if capabilities(c.strategy).compiles]
    for i, c in enumerate(allowed):
        if not c.fits:
            continue
        if usable is None:
            return c, "the least communication (GPU memory unknown: fits are not checked)"
        if i == 0:
            return c, f"the least communication; it fits with {human_bytes(c.memory.total)} per GPU"
        skipped = ", ".join(x.label for x in allowed[:i]) + (" does" if i == 1 else " do")
        return c, f"the fastest that fits, with {human_bytes(c.memory.total)} per GPU; {skipped} not"
    return None, ""


def resolve_micro_batch(
    spec: JobSpec, world: int, fits: Callable[[int], bool] | None = None
) -> tuple[int, int]:
    """(micro batch size, gradient accumulation steps) keeping the global batch over `world` data-parallel
    groups (ranks / strategy.sequence_parallel).

    auto: the largest power of two dividing global / ranks for which `fits(micro batch)`; with no memory
    limit to check (fits None), at most 8."""
    gbs = spec.train.global_batch_size
    if spec.train.micro_batch_size != "auto":
        mbs = spec.train.micro_batch_size
        return mbs, gbs // (mbs * world)
    if gbs % world:
        raise UserError(f"train.global_batch_size ({gbs}) must be divisible by the number of data-parallel groups ({world})")
    per_rank = gbs // world
    options = [1 << k for k in range(per_rank.bit_length()) if per_rank % (1 << k) == 0]
    if fits is None:
        mbs = max(o for o in options if o <= 8)
    else:
        mbs = next((o for o in reversed(options) if fits(o)), 1)
    return mbs, gbs // (mbs * world)


def spec_with(spec: JobSpec, **sections: dict) -> JobSpec:
    """`spec` with some fields of some sections changed (not validated again: for what-if estimates)."""
    return spec.model_copy(update={k: getattr(spec, k).model_copy(update=v) for k, v in sections.items()})


def no_fit_error(
    spec: JobSpec, counts: ParamCounts, candidates: list[Candidate], capacity: int, recount: bool, config=None,
    **where,
) -> UserError:
    """The smallest shortfall, and which change (more GPUs, a smaller micro batch, checkpointing, sequence
    parallelism, a shorter max_length, LoRA/QLoRA) would make the job fit, each checked with the memory model.
    `config`: the model's, for the sequence-parallel degrees it allows (None: none are offered)."""
    closest = min(candidates, key=lambda c: c.memory.total)
    need, usable = closest.memory.total, where["usable"]
    message = (
        f"the job fits no strategy on GPUs of {human_bytes(capacity)} ({human_bytes(usable)} usable): the "
        f"closest, {closest.label} at micro batch {closest.micro_batch_size}, needs {human_bytes(need)} per GPU, "
        f"{human_bytes(need - usable)} more"
    )

    def best(variant: JobSpec, variant_counts: ParamCounts, world: int) -> str | None:
        for strategy, offload in candidate_order(world):
            c = evaluate_candidate(variant, variant_counts, strategy, offload, **{**where, "world": world})
            if c.fits:
                return f"{c.label} needs {human_bytes(c.memory.total)}"
        return None

    one = {"micro_batch_size": 1}
    hints, world, nodes, gpus = [], where["world"], spec.resources.nodes, spec.resources.gpus_per_node
    for factor in (2, 4, 8, 16):
        found = best(spec_with(spec, train=one), counts, world * factor)
        if found:
            more = (
                f"{nodes * factor} nodes x {gpus}" if world > 1 or factor > 8 else f"1 node x {gpus * factor}"
            )
            hints.append(f"{more} GPUs: {found}")
            break
    variants = []
    if spec.train.micro_batch_size not in (1, "auto"):
        variants.append(
            ("train.micro_batch_size 1 (accumulation keeps the global batch)", spec_with(spec, train=one))
        )
    # each stronger checkpointing, the lighter recompute first: selective (no large matmul twice), then full
    for mode in CHECKPOINTING[CHECKPOINTING.index(spec.model.gradient_checkpointing) + 1 :]:
        checkpointing = spec_with(spec, train=one, model={"gradient_checkpointing": mode})
        variants.append((f"model.gradient_checkpointing: {mode}", checkpointing))
    for degree in sequence_parallel_degrees(spec, config):  # the smallest degree that fits, if one does
        split = spec_with(spec, strategy={"sequence_parallel": degree})
        if found := best(split, counts, world):
            hints.append(f"strategy.sequence_parallel: {degree} (each row split over {degree} ranks): {found}")
            break
    if spec.data.max_length > 512:
        half = spec.data.max_length // 2
        variants.append((f"data.max_length {half}", spec_with(spec, train=one, data={"max_length": half})))
    hints += [f"{what}: {found}" for what, variant in variants if (found := best(variant, counts, world))]
    if recount and spec.finetune.type != "qlora":
        lighter = "lora" if spec.finetune.type == "full" else "qlora"
        variant = spec_with(spec, finetune={"type": lighter})
        if found := best(variant, count_parameters(variant), world):
            hints.append(f"finetune.type: {lighter}: {found}")
    if not hints:
        hints.append(
            "no single change (up to 16x the GPUs, micro batch 1, gradient checkpointing, sequence parallelism, a "
            "shorter max_length, LoRA/QLoRA) is enough; combine them or use larger GPUs"
        )
    return UserError(message, "what would fit: " + "; ".join(hints))


def build_plan(
    spec: JobSpec,
    run_dir: Path,
    *,
    device: str | None = None,
    nnodes: int | None = None,
    counts: ParamCounts | None = None,
    free_space: Callable[[Path], int] | None = None,
    anywhere: bool = False,
) -> tuple[Plan, list[str]]:
    """Resolve `spec` into a Plan. Returns the plan and notices to show the user. `free_space(path)`: free
    bytes on path's filesystem (free_bytes; tests give their own). `anywhere` (`sharpen plan`): a device: cuda
    job is planned for CUDA GPUs even where none is visible; a run here is still refused (detect_device)."""
    notices: list[str] = []
    check_weights(spec)
    if device is None and spec.device == "cuda" and (spec.cluster.kind == "slurm" or anywhere):
        device = "cuda"  # the cluster's GPUs, or GPUs elsewhere, not this machine's: plan from anywhere
    if device is None:
        device, notice = detect_device(spec.device)
        if notice:
            notices.append(notice)
    nnodes = nnodes or spec.resources.nodes
    nproc = spec.resources.gpus_per_node
    world = nnodes * nproc
    no_gpu_here = False
    if device == "cuda" and spec.cluster.kind == "local" and nnodes == 1:
        import torch

        visible = torch.cuda.device_count()
        no_gpu_here = anywhere and visible == 0
        if nproc > visible and not no_gpu_here:
            raise UserError(
                f"resources.gpus_per_node is {nproc} but this machine has {visible} visible GPU(s)",
                f"set resources.gpus_per_node: {visible} (or fewer)",
            )
    if spec.model.attention == "flash_attention_2" and device != "cuda":
        raise UserError(
            "model.attention: flash_attention_2 needs a CUDA GPU", "use attention: sdpa on the CPU"
        )
    if spec.model.dtype == "fp16":
        raise UserError(
            "model.dtype: fp16 training needs a loss scaler, which sharpen does not run",
            "use dtype: bf16 (GPUs since Ampere) or fp32",
        )
    if problems := job_problems(spec):  # a JobSpec built in code has not been through the job loader's check
        raise UserError("; ".join(f"{field}: {message}" for field, message in problems))
    if problem := ranks_problem(spec.strategy.name, world):  # resources, or --nnodes
        raise UserError(problem)
    compute, storage = resolve_dtypes(spec, device)
    recount = counts is None
    config = None
    if recount:  # LoRA targets and the router settings against the model's layers, before PEFT builds them
        config = load_config(spec)
        if problems := layer_problems(spec, config) + sequence_problems(spec, config):
            raise UserError("; ".join(f"{field}: {message}" for field, message in problems))
    else:  # counts handed in: the config serves the sequence-parallel degrees where it is at hand
        try:
            config = load_config(spec)
        except UserError:
            pass
    counts = counts or count_parameters(spec)
    capacity, source = gpu_capacity(spec, device)
    usable = usable_bytes(capacity) if capacity else None
    where = {"world": world, "device": device, "compute": compute, "usable": usable}
    candidates = [evaluate_candidate(spec, counts, s, o, **where) for s, o in candidate_pairs(spec, world)]
    chosen, why = choose_strategy(spec, candidates, usable)
    if chosen is None and spec.strategy.name == "auto" and spec.strategy.sequence_parallel == 1:
        # whole rows fit no strategy: the smallest sequence-parallel degree with which one does
        for degree in sequence_parallel_degrees(spec, config):
            split = spec_with(spec, strategy={"sequence_parallel": degree})
            split_candidates = [evaluate_candidate(split, counts, s, o, **where) for s, o in candidate_pairs(split, world)]
            split_chosen, split_why = choose_strategy(split, split_candidates, usable)
            if split_chosen is not None:
                notices.append(
                    f"sequence parallelism: whole rows of {spec.data.max_length} tokens fit no strategy; each row is "
                    f"split over {degree} ranks (strategy.sequence_parallel: {degree}, chosen by strategy.name: auto; "
                    "set it in the job file to keep it)"
                )
                spec, candidates, chosen, why = split, split_candidates, split_chosen, split_why
                break
    if config is not None and (note := kv_heads_note(spec, config)):
        notices.append(note)
    if chosen is None or not any(c.fits for c in candidates):
        raise no_fit_error(spec, counts, candidates, capacity, recount, config, **where)
    if not chosen.fits:
        fitting = next(c for c in candidates if c.fits)
        notices.append(
            f"strategy {chosen.label} needs {human_bytes(chosen.memory.total)} per GPU, more than the "
            f"{human_bytes(usable)} usable: it will likely run out of memory; {fitting.label} fits (strategy.name: auto)"
        )
    if anywhere and device == "cuda" and (no_gpu_here or spec.cluster.kind != "local"):
        notices.append(unchecked_gpu_notice(spec, no_gpu_here, capacity, usable, chosen))
    if usable is None:
        where = "this is a CPU run" if device == "cpu" else source
        notices.append(
            f"memory per rank is estimated but not checked against a limit ({where}); "
            "set resources.gpu_memory_gb to plan for GPUs of that size"
        )
    notices += [f"memory: {n}" for n in chosen.notes]
    if host := chosen.memory.offloaded:
        per_node = f"{human_bytes(host * nproc)} per node of {nproc} rank(s)"
        at = (chosen.strategy, chosen.offload, world, device, compute, chosen.micro_batch_size, chosen.grad_accum)
        inputs = offloaded_activations(counts, setting_for(spec, *at))
        of_them = "" if not inputs else (" (the decoder layers' checkpointed inputs)" if inputs == host else
                                          f", {human_bytes(inputs)} of it the decoder layers' checkpointed inputs")
        notices.append(f"offload: {human_bytes(host)} of host memory per rank{of_them}, {per_node} (not checked)")
    strategy, mbs, accum = chosen.strategy, chosen.micro_batch_size, chosen.grad_accum
    if recount:  # (counts handed in stand for a model whose config need not be at hand)
        config = load_config(spec)
        check_family(spec, config, device, mbs)  # what its attention needs of the job's rows
    cpu_matmul = planned_cpu_matmul(spec, device, compute, nnodes, nproc)
    chosen_setting = setting_for(spec, strategy, chosen.offload, world, device, compute, mbs, accum)
    rollout_plan = rollout(counts, chosen_setting)
    if rollout_plan is not None:
        peak = rollout_plan["generation_peak_bytes"]
        rollout_plan.update(generation_gather(counts, chosen_setting, usable, peak, spec.method.generation_gather))
    job = spec.model_dump(mode="json")
    job["strategy"]["offload"] = chosen.offload  # what the ranks run with, when auto chose an offload
    job["strategy"]["sequence_parallel"] = spec.strategy.sequence_parallel  # and a sequence-parallel degree
    plan = Plan(
        sharpen_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        job=job,
        job_hash=job_hash(spec),
        run_dir=str(Path(run_dir).resolve()),
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        collective_timeout_s=collective_timeout_s(spec.train.hang_timeout_s),
        stop_grace_s=DEFAULT_STOP_GRACE_S if spec.cluster.slurm.grace_s is None else float(spec.cluster.slurm.grace_s),
        nnodes=nnodes,
        nproc_per_node=nproc,
        world_size=world,
        sequence_parallel=spec.strategy.sequence_parallel,
        strategy=strategy,
        strategy_reason=why,
        compute_dtype=compute,
        storage_dtype=storage,
        micro_batch_size=mbs,
        grad_accum=accum,
        global_batch_size=spec.train.global_batch_size,
        params=plan_params(counts),
        state_bytes_per_rank=state_bytes(chosen.memory),
        reference=reference_model(spec, rollout_plan["reference_bytes"] if rollout_plan else 0),
        rollout=rollout_plan,
        cpu_matmul=cpu_matmul,
        offload=chosen.offload,
        gpu_memory_bytes=capacity,
        usable_bytes=usable,
        candidates=[c.to_dict() for c in candidates],
        chosen=chosen.to_dict(),
    )
    if notice := disk_notice(spec, Path(plan.run_dir), plan.checkpoint_bytes, free_space or free_bytes):
        notices.append(notice)
    return plan, notices


def plan_params(counts: ParamCounts) -> dict[str, int]:
    """Plan.params: total, trainable and frozen parameters, those a token passes through (`active`: what
    FLOPs count), and for a mixture of experts its experts per layer and those each token is routed to."""
    params = {"total": counts.total, "trainable": counts.trainable, "frozen": counts.frozen}
    params["active"] = counts.active_params
    if counts.num_experts:
        params.update(experts=counts.num_experts, experts_per_token=counts.experts_per_token)
    return params


def unchecked_gpu_notice(
    spec: JobSpec, no_gpu_here: bool, capacity: int | None, usable: int | None, chosen: Candidate
) -> str:
    """`sharpen plan` of a CUDA job whose GPUs are not this machine's: what its memory was checked against."""
    if no_gpu_here:
        head = "no CUDA GPU is visible here: planned for CUDA GPUs elsewhere (`sharpen run` needs a machine with one)"
    else:
        head = "planned for the cluster's GPUs, not this machine's"
    if capacity is None:
        return f"{head}; nothing is checked against a real GPU"
    fit = "fits" if chosen.fits else "does not fit"
    return (
        f"{head}; nothing is checked against a real GPU, memory against resources.gpu_memory_gb: "
        f"{spec.resources.gpu_memory_gb:g} ({human_bytes(capacity)} a GPU, {human_bytes(usable)} usable): "
        f"{chosen.label} {fit} with {human_bytes(chosen.memory.total)} per GPU"
    )


def checkpoints_on_disk(spec: JobSpec) -> int:
    """The most checkpoints the run dir holds at once: keep_last, and the one being written, but no more
    than the run saves (every save_every steps, and at the end)."""
    every, steps = spec.train.save_every, spec.train.max_steps
    saves = (steps - 1) // every + 1 if every else 1
    return min(spec.train.keep_last + 1, saves)


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem of `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_notice(spec: JobSpec, run_dir: Path, checkpoint_bytes: int, free_space: Callable[[Path], int]) -> str | None:
    """A notice when the run dir's filesystem cannot hold the checkpoints the run keeps at once; None when
    it can, or when its free space cannot be read."""
    count = checkpoints_on_disk(spec)
    needed = count * checkpoint_bytes
    try:
        free = free_space(run_dir)
    except OSError:
        return None
    if needed <= free:
        return None
    return (
        f"disk: {run_dir} has {human_bytes(free)} free, less than the {count} checkpoint(s) of about "
        f"{human_bytes(checkpoint_bytes)} it holds at once (the last train.keep_last: {spec.train.keep_last}, and "
        "the one being written): the run will stop at the first checkpoint that does not fit; free space there, "
        "lower train.keep_last or choose another --output-dir"
    )


def state_bytes(memory: MemoryEstimate) -> dict[str, int]:
    """What a rank holds besides activations and buffers, as the chosen strategy's footprint counts it:
    params, grads, optimizer (device, their sum `total`) and offloaded (host)."""
    device = {"params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer}
    return {**device, "total": sum(device.values()), "offloaded": memory.offloaded}


def planned_cpu_matmul(spec: JobSpec, device: str, compute: str, nnodes: int, nproc: int) -> str | None:
    """model.cpu_matmul resolved (training/kernels/): auto is measured here when the ranks run here (one
    local machine, at their thread count), else left to the ranks (None)."""
    from cluster.local import rank_threads
    from training.kernels import resolve_cpu_matmul

    here = spec.cluster.kind == "local" and nnodes == 1
    return resolve_cpu_matmul(spec.model.cpu_matmul, device, compute, rank_threads(nproc) if here else None)


def default_run_dir(spec: JobSpec) -> Path:
    if spec.output_dir:
        return Path(spec.output_dir)
    return Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_weights(spec: JobSpec) -> None:
    """data.train weights, refused where the rows are not drawn by the sampler's mix: GRPO's prompts and a
    precomputed reference (DPO, KTO) choose their rows from the one-pool order before training."""
    weights = [f.weight for f in spec.data.train]
    if not mixing(weights):
        return
    reference = reference_model(spec)
    if spec.method.kind == "grpo":
        why = "grpo draws its prompts from one pool (each prompt once an epoch)"
    elif reference and reference["source"] == "precomputed":
        why = (f"{spec.method.kind}'s reference is precomputed before training, for the rows of the one-pool "
               "order (full fine-tuning or method.reference: precompute)")
    else:
        return
    raise UserError(
        f"data.train[0].weight: the sources are weighted ({', '.join(f'{w:g}' for w in weights)}), but {why}",
        "leave out the weights (the sources are then one pool, each record once an epoch)"
        + ("; with LoRA, method.reference: auto draws the mix" if spec.method.kind != "grpo" else ""),
    )


def data_sources(spec: JobSpec, cache: Path) -> list[dict]:
    """Each data.train entry as `sharpen plan` shows it: path, weight, records, tokens, share of the samples drawn
    and epochs over train.max_steps (how many times its samples are seen), from the prepared cache entry."""
    from training.data.cache import prepared_meta
    from training.data.sampler import shares

    meta = prepared_meta(cache)
    prepared = meta["sources"]
    weights = [f.weight for f in spec.data.train]
    mixes = mixing(weights)
    rows = [p["rows"] if p["rows"] is not None else p["samples"] for p in prepared]
    share = shares(rows, weights)
    drawn = spec.train.max_steps * spec.train.global_batch_size  # rows drawn over the run
    out = []
    for p, w, n, sh in zip(prepared, weights, rows, share, strict=True):
        if mixes or p["rows"] is not None:
            epochs = drawn * sh / n if n else 0.0
        else:  # packed into one pool: every row, so every sample, seen drawn / rows times
            epochs = drawn / max(1, meta["rows"])
        out.append({"path": p["path"], "weight": w, "records": p["records"], "samples": p["samples"],
                    "tokens": p["tokens"], "share": sh, "epochs": epochs})
    return out


def prepared_data_sources(spec: JobSpec, data_cache: str | None) -> tuple[list[dict] | None, str | None]:
    """(data_sources, None), tokenizing into the shared cache first unless `data_cache` is given (`sharpen run`
    then finds it there); (None, why) when the tokenizer does not load (a directory of config.json alone)."""
    from training.data.cache import load_tokenizer
    from training.data.prepare import prepare_dataset

    tokenizer = spec.model.tokenizer or spec.model.path
    if data_cache is None:
        try:
            load_tokenizer(tokenizer, spec.model.trust_remote_code)
        except UserError:  # its message is the loader's, many lines long: `sharpen run` shows it
            return None, f"no tokenizer loads from {tokenizer} here (model.tokenizer names where one is)"
        data_cache = prepare_dataset(
            spec.data, spec.method.kind, tokenizer, trust_remote_code=spec.model.trust_remote_code,
            train_on=getattr(spec.method, "train_on", "all"),
        )
    return data_sources(spec, Path(data_cache)), None


def reference_model(spec: JobSpec, frozen_copy_bytes: int = 0) -> dict[str, Any] | None:
    """Where DPO's, KTO's or GRPO's reference log-probabilities come from and what they cost
    (training/methods/dpo.py, kto.py, grpo.py); None otherwise: for GRPO with beta 0 (no KL term), and for
    ORPO and SimPO, which compare the policy's own chosen and rejected answers.

    DPO holds no second copy of the model: LoRA switches its adapter off for a no-grad forward each
    micro-batch; full fine-tuning (or reference: precompute) runs the initial model once before step 1.
    GRPO's completions are new every step, so nothing can be precomputed: LoRA switches its adapter off,
    full fine-tuning holds a frozen copy of the initial model (`frozen_copy_bytes` of it on each rank,
    sharded as the policy is)."""
    method = spec.method
    if method.kind == "grpo":
        if method.beta == 0:
            return None
        forward = "one more forward (no backward) per micro-batch, on its completion tokens"
        if spec.finetune.type != "full":
            return {
                "source": "adapter_disabled",
                "what": "the base model with the LoRA adapter switched off",
                "memory_bytes_per_rank": 0,
                "compute": forward,
            }
        return {
            "source": "frozen_copy",
            "what": "a frozen copy of the initial model in the compute dtype, sharded as the policy",
            "memory_bytes_per_rank": frozen_copy_bytes,
            "compute": forward,
        }
    if method.kind not in ("dpo", "kto"):
        return None
    # KTO's reference point z0 (training/methods/kto.py): each step's KL pairs, under the policy (always,
    # no backward) and under the reference (with it per micro-batch, or precomputed per step).
    kl = method.kind == "kto"
    if spec.finetune.type != "full" and method.reference == "auto":
        return {
            "source": "adapter_disabled",
            "what": "the base model with the LoRA adapter switched off",
            "memory_bytes_per_rank": 0,
            "compute": "three more forwards (no backward) per micro-batch: the reference on its completions, policy "
            "and reference on its KL pairs" if kl else
            "one more forward (no backward) per micro-batch: about a third more per step",
        }
    pairs = spec.train.max_steps * spec.train.global_batch_size
    return {
        "source": "precomputed",
        "what": "the initial model's log-probabilities, computed once before step 1 into RUN/reference/",
        "memory_bytes_per_rank": 0,
        "compute": f"two forwards (no backward) over up to {pairs:,} training completions and their KL pairs and the "
        "eval set, before training; one more (the policy on its KL pairs) per micro-batch" if kl else
        f"one forward (no backward) over up to {pairs:,} training pairs and the eval pairs, before training",
    }
