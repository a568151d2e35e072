"""What strategy.sequence_parallel asks of the model, checked against its config before launch.

Ulysses sequence parallelism (training/kernels/sequence_parallel.py) turns each rank's chunk of every head into
every token of a share of the heads around attention: the query heads must divide among the group's ranks.
Key and value heads that do not divide are repeated to the query heads first (more bytes moved, the same
attention), which the plan says. A mixture-of-experts model is refused: its routers' load-balancing loss is a
function of the whole row's routing, which a chunk does not see (not built yet).
"""

from __future__ import annotations

from launcher.spec import JobSpec, one_of


def sequence_problems(spec: JobSpec, config, degree: int | None = None) -> list[tuple[str, str]]:
    """(field, message) for each reason the model of `config` cannot split its rows over `degree` ranks
    (default the job's strategy.sequence_parallel); none for a degree of 1."""
    from training.moe import config_is_moe

    degree = spec.strategy.sequence_parallel if degree is None else degree
    if degree == 1:
        return []
    text = config.get_text_config()
    heads = text.num_attention_heads
    problems = []
    if heads % degree:
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and spec.world_size % n == 0]
        fix = f"use {one_of(map(str, fits[:4]))}" if fits else "set it to 1"
        problems.append(("strategy.sequence_parallel", f"{degree}, but the model's {heads} attention heads do not "
                         f"divide among {degree} ranks (each rank attends with a share of the heads); {fix}"))
    if config_is_moe(config):
        problems.append(("strategy.sequence_parallel", f"{degree}, but the model routes tokens to experts, and its "
                         "routers' load-balancing loss needs the whole row's routing, which no rank sees; set it to 1"))
    return problems


def kv_heads_note(spec: JobSpec, config) -> str | None:
    """The plan's notice when the key/value heads are repeated to the query heads before the all-to-all."""
    degree = spec.strategy.sequence_parallel
    text = config.get_text_config()
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if degree == 1 or kv % degree == 0:
        return None
    return (f"sequence parallelism: the model's {kv} key/value heads do not divide among {degree} ranks, so they are "
            f"repeated to its {text.num_attention_heads} query heads before each all-to-all "
            f"({text.num_attention_heads // kv}x the key and value bytes moved)")
