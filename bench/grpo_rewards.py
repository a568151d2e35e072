"""bench_grpo.py's reward functions, in TRL's signature fn(prompts, completions, **columns) -> list[float].

Both arms load this file: sharpen by the job file's `rewards: [{function: .../grpo_rewards.py:NAME}]`,
TRL's GRPOTrainer as `reward_funcs`. They are cheap on purpose (string work only): the bench measures the
trainers, and scoring a batch of 16 completions is a small part of a step either way.
"""

from __future__ import annotations


def _texts(completions) -> list[str]:
    return [c if isinstance(c, str) else c[0]["content"] for c in completions]


def says_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the completion contains the record's answer (the `answer` column), else 0."""
    return [1.0 if a and a in t else 0.0 for t, a in zip(_texts(completions), answer, strict=True)]


def echoes_prompt(prompts, completions, **kwargs) -> list[float]:
    """The share of the completion's words that occur in its prompt: graded, so groups of a random model's
    completions differ and the advantages are not all zero."""
    scores = []
    for prompt, text in zip(prompts, _texts(completions), strict=True):
        words = text.split()
        seen = set(prompt.split())
        scores.append(sum(w in seen for w in words) / len(words) if words else 0.0)
    return scores
