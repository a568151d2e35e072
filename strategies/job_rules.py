"""The job file's rules that depend on what its strategy can run, read from the capabilities each strategy
declares in the registry; the strategy names in the messages come from the registry too.

launcher/spec.py is a contract module and cannot import strategies/: the job loader hands these rules to
JobSpec's validation (launcher/jobfile.py), so they are reported in the one list of problems, each under
its field, and the planner checks them again for JobSpecs built in code.
"""

from __future__ import annotations

import re

from launcher.spec import JobSpec
from strategies import candidate_order, capabilities, registered_names
from strategies.capabilities import Capabilities


def job_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for each rule the job's strategy breaks; none under `auto`, whose choice obeys them."""
    name, offload = spec.strategy.name, spec.strategy.offload
    if name == "auto":
        return []
    caps, world, problems = capabilities(name), spec.world_size, []
    if not caps.runs_on(world):
        asked = f"{world} ({spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} gpus_per_node)"
        others = [n for n in registered_names() if capabilities(n).runs_on(world)]
        use = either([*ranges(others), "auto"])
        problems.append(("strategy.name", f"{name!r} {runs(caps)}, but resources ask for {asked}; use {use}"))
    if offload != "none" and offload not in caps.offloads:
        takers = [n for n in registered_names() if offload in capabilities(n).offloads]
        if offload == "params":
            message = f"{offload!r} needs strategy.name {either(takers)} (or auto), not {name!r}"
        else:  # those that offload just the optimizer first, the one that also does so on one GPU before them
            one_gpu = {n for n, o in candidate_order(1) if o == offload}
            takers.sort(key=lambda n: (n not in one_gpu, capabilities(n).offload_moves_all_state))
            use = either([*(f"{n} (one GPU works too)" if n in one_gpu else n for n in takers), "auto"])
            message = f"{offload!r} needs a sharded strategy, not {name!r}: use {use}"
        problems.append(("strategy.offload", message))
    # Sharding 4-bit weights needs their storage dtype to match the other weights'.
    storage, dtype = spec.finetune.quant_storage, spec.model.dtype
    if spec.finetune.type == "qlora" and caps.shards_parameters and storage not in ("auto", dtype):
        if storage == "uint8" or dtype != "auto":
            why = f"{storage!r} cannot be sharded by {name} next to {dtype} weights"
            use = "use auto (the compute dtype) or the same dtype as model.dtype"
            problems.append(("finetune.quant_storage", f"{why}; {use}"))
    if spec.model.compile and not caps.compiles:
        # the closest to what was asked first: those that shard parameters, then those that run many ranks
        compiling = [n for n in registered_names() if capabilities(n).compiles]
        compiling.sort(key=lambda n: (not capabilities(n).shards_parameters, capabilities(n).max_ranks is not None))
        why = f"is not supported with {caps.compile_conflict.format(name=name)}"
        problems.append(("model.compile", f"{why}; use strategy.name {either(compiling)}, or set model.compile: false"))
    return problems


def ranks_problem(name: str, world: int) -> str | None:
    """The message when strategy `name` cannot run `world` ranks (the job's resources, or `--nnodes`)."""
    if name == "auto" or capabilities(name).runs_on(world):
        return None
    return f"strategy.name: {name} {runs(capabilities(name))}, but resources ask for {world}"


def runs(caps: Capabilities) -> str:
    return "runs one rank" if caps.max_ranks == 1 else f"runs at most {caps.max_ranks} ranks"


def either(items: list[str]) -> str:
    """`a, b or c`."""
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def ranges(names: list[str]) -> list[str]:
    """Names numbered in a row shortened to one range: zero1, zero2, zero3 -> zero1-3 (three or more)."""
    out: list[str] = []
    run: list[tuple[str, int]] = []
    for name in [*names, ""]:
        match = re.fullmatch(r"(\D+)(\d+)", name)
        step = (match[1], int(match[2])) if match else None
        if step and run and step == (run[-1][0], run[-1][1] + 1):
            run.append(step)
            continue
        if len(run) >= 3:
            out.append(f"{run[0][0]}{run[0][1]}-{run[-1][1]}")
        else:
            out += [f"{p}{n}" for p, n in run]
        run = [step] if step else []
        if not step and name:
            out.append(name)
    return out
