"""How a plan reads on the terminal: the resolved job, then every candidate strategy's memory per rank."""

from __future__ import annotations

from launcher.candidates import GIB, candidate_label
from launcher.method_spec import PAIR_METHODS
from launcher.plan import Plan
from launcher.shapes import human_bytes
from launcher.spec import mixing

COLUMNS = ("params", "grads", "optimizer", "buffers", "activations", "total", "offloaded")
WIDTH = 120  # the tables' width when stdout is not a terminal (files, pipes, docs)


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def print_plan(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    spec = plan.spec
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDTH)
    table = Table(title=f"sharpen plan: {spec.name}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("model", f"{spec.model.path} ({spec.finetune.type}, {spec.method.kind})")
    if spec.model.chat_template:
        table.add_row("chat template", f"{spec.model.chat_template} (in place of the tokenizer's; saved in final/)")
    table.add_row("device", f"{plan.device} ({plan.backend}), compute {plan.compute_dtype}")
    table.add_row("ranks", f"{plan.nnodes} node(s) × {plan.nproc_per_node} = {plan.world_size}")
    offload = "" if plan.offload == "none" else f" + offload {plan.offload}"
    table.add_row("strategy", f"{plan.strategy}{offload} ({plan.strategy_reason})")
    degree = plan.sequence_parallel
    groups = f"ranks {plan.world_size}" if degree == 1 else f"data-parallel groups {plan.world_size // degree}"
    table.add_row(
        "batch",
        f"micro {plan.micro_batch_size} × accumulation {plan.grad_accum} × {groups}"
        f" = global {plan.global_batch_size} samples"
        f" of up to {plan.rollout['row_length'] if plan.rollout else spec.data.max_length} tokens",
    )
    p = plan.params
    share = 100 * p["trainable"] / max(1, p["total"])
    table.add_row("parameters", f"{p['total']:,} total, {p['trainable']:,} trainable ({share:.2f}%)")
    if p.get("experts"):
        table.add_row("experts", experts_line(p))
    if degree > 1:
        table.add_row("sequence parallel", sequence_parallel_line(plan))
    if plan.chosen:
        b = plan.chosen["bytes_per_rank"]
        parts = " + ".join(f"{k} {human_bytes(b[k])}" for k in COLUMNS[:5])
        if b.get("frozen_models"):
            parts += f" + reference and reward models {human_bytes(b['frozen_models'])}"
        host = f"; {human_bytes(b['offloaded'])} offloaded to host memory" if b["offloaded"] else ""
        table.add_row("memory per rank", f"{human_bytes(b['total'])} at the peak ({parts}){host}")
    if plan.reference:
        r = plan.reference
        held = human_bytes(r["memory_bytes_per_rank"]) + " per rank" if r["memory_bytes_per_rank"] else "no extra memory"
        table.add_row("reference", f"{r['what']}: {held}; {r['compute']}")
    elif spec.method.kind in PAIR_METHODS:
        table.add_row("reference", f"none: {spec.method.kind} holds no reference model and computes none")
    if plan.rollout:
        table.add_row("rollout", rollout_line(plan.rollout))
    table.add_row("steps", f"{spec.train.max_steps}, checkpoint every {spec.train.save_every or 'end only'}")
    table.add_row("run dir", plan.run_dir)
    console.print(table)
    if plan.candidates:
        console.print(candidates_table(plan))
    console.print(sources_table(plan))


def sequence_parallel_line(plan: Plan) -> str:
    """Sequence parallelism in one line: the ranks a row is split over, and the all-to-all bytes each sends."""
    degree, spec = plan.sequence_parallel, plan.spec
    sent = (plan.chosen or {}).get("all_to_all_bytes_per_step")
    volume = f"; all-to-all {human_bytes(sent)} per rank per step" if sent is not None else ""
    return f"{degree} ranks per row ({spec.data.max_length // degree:,} of its {spec.data.max_length:,} tokens each){volume}"


def experts_line(p: dict) -> str:
    """A mixture of experts in one line: its experts, those a token uses, the parameters that makes active."""
    active = 100 * p["active"] / max(1, p["total"])
    return (
        f"{p['experts']} a layer, {p['experts_per_token']} routed per token: {p['active']:,} parameters active per "
        f"token ({active:.1f}%), what FLOPs and MFU count; memory holds all {p['total']:,}"
    )


def rollout_line(r: dict) -> str:
    """GRPO's generation phase per rank, in one line."""
    return (
        f"{r['generation_batch']} completions a rank generated as one batch of up to {r['row_length']} tokens: "
        f"KV cache {human_bytes(r['kv_cache_bytes'])}, decode logits {human_bytes(r['decode_logits_bytes'])}, "
        f"reference {human_bytes(r['reference_bytes'])}, reward models {human_bytes(r['reward_model_bytes'])}; "
        f"generation peak {human_bytes(r['generation_peak_bytes'])}{GATHER_NOTE[r.get('gather', 'none')](r)}"
        + (f", LoRA merged for generation ({human_bytes(r['merged_lora_bytes'])})" if r.get("merge_lora") else "")
    )


GATHER_NOTE = {
    "none": lambda r: "",
    "rollout": lambda r: f", plus the whole model gathered once per rollout ({human_bytes(r['gathered_bytes'])})",
    "forward": lambda r: "; parameters gathered per forward (the whole model gathered once would not fit)",
}


def candidates_table(plan: Plan):
    """One row per candidate: GiB per rank by category, and whether it fits."""
    from rich import box
    from rich.table import Table

    if plan.usable_bytes is None:
        limit = "GPU memory unknown: not checked"
    else:
        limit = f"GPU {gib(plan.gpu_memory_bytes)} GiB, {gib(plan.usable_bytes)} usable"
    table = Table(title=f"memory per rank, GiB ({limit})", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("strategy", no_wrap=True)
    table.add_column("micro", justify="right")
    for name in COLUMNS:
        table.add_column("host" if name == "offloaded" else name, justify="right")
    table.add_column("fits")
    chosen = (plan.chosen or {}).get("strategy"), (plan.chosen or {}).get("offload")
    for c in plan.candidates:
        b = c["bytes_per_rank"]
        mark = "→ " if (c["strategy"], c["offload"]) == chosen else "  "
        fits = "-" if plan.usable_bytes is None else ("yes" if c["fits"] else "no")
        cells = [gib(b[k]) if b[k] or k != "offloaded" else "" for k in COLUMNS]
        label = mark + candidate_label(c["strategy"], c["offload"])
        table.add_row(label, str(c["micro_batch_size"]), *cells, fits)
    return table


def weight_text(weight: float | None) -> str:
    return "-" if weight is None else f"{weight:g}"


def sources_table(plan: Plan):
    """One row per data.train entry: its records and tokens, its share of the samples drawn and how many times
    its samples are seen over train.max_steps (data tokenized into the cache first, which `sharpen run` reuses)."""
    from rich import box
    from rich.table import Table

    from launcher.planner import prepared_data_sources

    spec = plan.spec
    sources, why = prepared_data_sources(spec, plan.data_cache)
    mixes = mixing([f.weight for f in spec.data.train])
    how = "each source's weight over the sum of the weights" if mixes else "no weights: one pool, each record once an epoch"
    table = Table(title=f"data.train over {spec.train.max_steps} steps of {spec.train.global_batch_size} samples ({how})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for name in ("source", "weight", "records", "samples", "tokens", "share", "epochs"):
        table.add_column(name, justify="left" if name == "source" else "right")
    if sources is None:
        for f in spec.data.train:
            table.add_row(f.path, weight_text(f.weight), "-", "-", "-", "-", "-")
        table.caption = f"not tokenized: {why}"
        return table
    for s in sources:
        table.add_row(s["path"], weight_text(s["weight"]), f"{s['records']:,}", f"{s['samples']:,}", f"{s['tokens']:,}",
                      f"{100 * s['share']:.1f}%", f"{s['epochs']:.2f}")
    return table
