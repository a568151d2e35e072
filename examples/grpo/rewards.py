"""Reward functions for examples/grpo/job.yaml, in TRL's signature:

    fn(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` are lists of strings here (string prompts; with chat-message prompts each
completion arrives as [{"role": "assistant", "content": ...}]); every other column of the data arrives
by its name, one value per completion (here `answer`), with `completion_ids` too. A function may name
only the arguments it wants and take the rest as **kwargs. None means "no reward for this completion":
it is left out of the weighted sum, and a completion no reward scores gets advantage 0.
"""

from __future__ import annotations

import string

PLAIN = set(string.ascii_lowercase + " ")


def lowercase_share(prompts, completions, **kwargs) -> list[float]:
    """The share of a completion's characters that are lowercase letters or spaces (0 for an empty one).

    Easy for a randomly initialised tiny model to learn within a few dozen steps: it only has to shift
    probability toward a subset of its vocabulary. A real job scores correctness; see `exact_answer`."""
    return [sum(ch in PLAIN for ch in c) / len(c) if c else 0.0 for c in completions]


def exact_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 where the completion starts with the record's `answer` column, else 0.0; None where the
    record has no answer (a column a record lacks arrives as None). Not in the job: a 0.1M-parameter
    random model never gets one right, so it would only add zeros. Add it to method.rewards to try it."""
    pairs = zip(completions, answer, strict=True)
    return [None if a is None else float(c.strip().startswith(a)) for c, a in pairs]
