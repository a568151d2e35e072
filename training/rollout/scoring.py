"""Scoring a step's completions: each reward (a Python function or a reward model) per completion, and
their weighted sum, with one RewardError naming the reward and the step for any bad value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from launcher.method_spec import RewardSpec
from training.data.formats import Encoder
from training.rollout.rewards import (
    COMPLETION_IDS,
    COMPLETIONS,
    PROMPTS,
    RewardLoadError,
    accepted_arguments,
    load_reward_function,
)

Prompt = str | list[dict]


class RewardError(RuntimeError):
    """A reward that could not score a step: which one, at which step, and the first bad completion."""

    def __init__(self, reward: str, step: int, message: str, index: int | None = None):
        where = "" if index is None else f" (completion {index})"
        super().__init__(f"reward {reward!r} at step {step}{where}: {message}")
        self.reward, self.step, self.index = reward, step, index


def as_messages(completion: str) -> list[dict]:
    """A completion of a chat prompt as TRL hands it to reward functions: one assistant message."""
    return [{"role": "assistant", "content": completion}]


class RewardModel:
    """A sequence-classification model, frozen, scoring prompt + completion rendered as it was trained.

    The text is what sharpen's preference format trains a reward model on: a message prompt and the
    completion as an assistant turn through the model's tokenizer's chat template, a string prompt and
    the completion concatenated; then BOS and EOS once each. The score is the model's logit, batched
    with right padding (transformers reads it at each row's last non-pad token, as the training did)."""

    def __init__(self, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 batch_size: int = 16, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval().requires_grad_(False)
        if self.model.config.pad_token_id is None:  # as training/model.py gives a reward model its pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.pad_token_id = self.model.config.pad_token_id
        self.device, self.batch_size = torch.device(device), batch_size
        self._encoder = Encoder(self.tokenizer, "all")

    def text(self, prompt: Prompt, completion: str) -> str:
        """The text the model scores for one completion."""
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt + as_messages(completion), tokenize=False)
        return prompt + completion

    def token_ids(self, prompt: Prompt, completion: str) -> list[int]:
        ids = self.tokenizer(self.text(prompt, completion), add_special_tokens=False)["input_ids"]
        return self._encoder.finish(list(ids), [False] * len(ids))[0]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        """[n] float32 scores on the CPU, one per (prompt, completion)."""
        rows = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def reward_names(rewards: Sequence[RewardSpec]) -> list[str]:
    """A name per reward for metrics: the function's name, or the model's last two path parts; unique."""
    names = []
    for i, r in enumerate(rewards):
        name = r.function.rsplit(":", 1)[1] if r.function else "/".join(Path(r.model).parts[-2:])
        names.append(name if name not in names else f"{name}#{i}")
    return names


class RewardScorer:
    """The job's rewards, built once per rank: `score` gives each completion its weighted total.

    A function gets TRL's keyword arguments: prompts, completions (text, or one assistant message each
    when the prompt is messages), completion_ids (when given) and every data column (one value per
    completion); a function without **kwargs gets only the ones it names. A reward of None means "no
    reward for this completion": it counts as NaN and is left out of the weighted sum (TRL's nansum);
    a completion no reward scored has a NaN total (as TRL marks it, so the group's baseline leaves it out)."""

    def __init__(self, rewards: Sequence[RewardSpec], *, base: Path | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", batch_size: int = 16, trust_remote_code: bool = False):
        self.names = reward_names(rewards)
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self._scorers: list[Callable] = []
        for name, r in zip(self.names, rewards, strict=True):
            if r.model:
                self._scorers.append(RewardModel(r.model, dtype=dtype, device=device, batch_size=batch_size,
                                                 trust_remote_code=trust_remote_code))
                continue
            try:  # the launcher checked it; a file changed since is still one clear message
                fn = load_reward_function(r.function, base)
            except RewardLoadError as e:
                raise RewardError(name, 0, f"{e.message} ({e.hint})") from None
            self._scorers.append(fn)

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], columns: dict[str, Sequence[Any]],
              step: int, completion_ids: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total [n] float32, {reward name: [n] float32 values, NaN where it gave None})."""
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError(f"score needs one prompt and one value of each column per completion ({n})")
        per_reward = {}
        for name, scorer in zip(self.names, self._scorers, strict=True):
            if isinstance(scorer, RewardModel):
                per_reward[name] = scorer(prompts, completions)
            else:
                per_reward[name] = self._call(name, scorer, prompts, completions, columns, step, completion_ids)
        values = torch.stack(list(per_reward.values()), dim=1) if per_reward else torch.zeros(n, 0)
        total = (values * self.weights).nansum(dim=1)
        total[values.isnan().all(dim=1)] = math.nan
        return total, per_reward

    @staticmethod
    def _call(name: str, fn: Callable, prompts, completions, columns, step: int, completion_ids) -> torch.Tensor:
        shown = [as_messages(c) if isinstance(p, list) else c for p, c in zip(prompts, completions, strict=True)]
        kwargs = {PROMPTS: list(prompts), COMPLETIONS: shown, **{k: list(v) for k, v in columns.items()}}
        if completion_ids is not None:
            kwargs[COMPLETION_IDS] = [list(ids) for ids in completion_ids]
        accepted = accepted_arguments(fn)
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        try:
            output = fn(**kwargs)
        except Exception as e:
            raise RewardError(name, step, f"raised {type(e).__name__}: {e}") from e
        return checked_values(name, step, output, len(completions))


def checked_values(name: str, step: int, output: Any, n: int) -> torch.Tensor:
    """A reward function's output as [n] float32 (None → NaN); RewardError at the first value that is not one."""
    if isinstance(output, torch.Tensor) or hasattr(output, "tolist"):
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        raise RewardError(name, step, f"returned {type(output).__name__}, not a list of {n} rewards")
    if len(output) != n:
        raise RewardError(name, step, f"returned {len(output)} rewards for {n} completions")
    values = []
    for i, value in enumerate(output):
        if value is None:
            values.append(math.nan)
        elif not isinstance(value, numbers.Real):
            raise RewardError(name, step, f"returned {type(value).__name__} {value!r:.40}, not a number", i)
        elif not math.isfinite(value):
            raise RewardError(name, step, f"returned {value}, not a finite number (None means no reward)", i)
        else:
            values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)
