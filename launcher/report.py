"""How a plan reads on the terminal."""

from __future__ import annotations

from launcher.memory import human_bytes
from launcher.plan import Plan


def print_plan(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    spec = plan.spec
    console = Console()
    table = Table(title=f"sharpen plan: {spec.name}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("model", f"{spec.model.path} ({spec.finetune.type}, {spec.method.kind})")
    table.add_row("device", f"{plan.device} ({plan.backend}), compute {plan.compute_dtype}")
    table.add_row("ranks", f"{plan.nnodes} node(s) × {plan.nproc_per_node} = {plan.world_size}")
    table.add_row("strategy", f"{plan.strategy} ({plan.strategy_reason})")
    table.add_row(
        "batch",
        f"micro {plan.micro_batch_size} × accumulation {plan.grad_accum} × ranks {plan.world_size}"
        f" = global {plan.global_batch_size} samples",
    )
    p = plan.params
    share = 100 * p["trainable"] / max(1, p["total"])
    table.add_row("parameters", f"{p['total']:,} total, {p['trainable']:,} trainable ({share:.2f}%)")
    b = plan.state_bytes_per_rank
    table.add_row(
        "state per rank",
        f"params {human_bytes(b['params'])} + grads {human_bytes(b['grads'])} + optimizer "
        f"{human_bytes(b['optimizer'])} = {human_bytes(b['total'])} (before activations)",
    )
    table.add_row("steps", f"{spec.train.max_steps}, checkpoint every {spec.train.save_every or 'end only'}")
    table.add_row("run dir", plan.run_dir)
    console.print(table)
