"""GRPO's advantages: each completion's reward against the rewards of its group (the completions of the
same prompt), scaled as `method.scale_rewards` says.

A step's rewards are laid out prompt-major: prompt 0's `num_generations` completions, then prompt 1's,
and so on. Scaling by the batch's std needs every reward of the step, so these functions take the whole
step's reward vector (the integration gathers it across ranks first) and every rank computes the same
advantages from it.

As TRL's GRPOTrainer (grpo_trainer.py, `_generate_and_score_completions`): the std is the unbiased one
(Bessel's correction, TRL's `nanstd`), 1e-4 is added to it, and a NaN reward marks a completion no
reward function scored: it is left out of its group's mean and std, and its advantage is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from launcher.method_spec import REWARD_SCALINGS

STD_EPSILON = 1e-4  # TRL's: a group of equal rewards gets advantage 0 instead of 0/0


class Advantages(NamedTuple):
    values: torch.Tensor  # [completions], prompt-major, in the rewards' dtype
    all_equal_share: torch.Tensor  # 0-dim: share of groups whose (scored) rewards are all equal


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std of the non-NaN values (Bessel's correction); NaN where fewer than two are left."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    squares = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True)
    variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.nan)
    std = variance.sqrt()
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> Advantages:
    """A = r - mean(group); "group": / (std(group) + 1e-4), "batch": / (std(all rewards) + 1e-4),
    "none": not divided (Dr. GRPO). `rewards`: [prompts x num_generations], prompt-major."""
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"scale_rewards must be one of {REWARD_SCALINGS}, not {scale!r}")
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be one vector of whole groups of {num_generations}, got shape {tuple(rewards.shape)}"
        )
    groups = rewards.double().view(-1, num_generations)  # fp64: a mean and std of many terms
    advantages = groups - torch.nanmean(groups, dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (nanstd(groups, dim=1, keepdim=True) + STD_EPSILON)
    elif scale == "batch":
        advantages = advantages / (nanstd(groups) + STD_EPSILON)
    values = torch.nan_to_num(advantages, nan=0.0).flatten().to(rewards.dtype)
    return Advantages(values, all_equal_share(groups))


def all_equal_share(groups: torch.Tensor) -> torch.Tensor:
    """Share of the rows of `groups` whose non-NaN values are all equal (a group with at most one
    scored completion counts as equal: it teaches nothing either)."""
    scored = ~groups.isnan()
    highest = torch.where(scored, groups, -torch.inf).amax(dim=1)
    lowest = torch.where(scored, groups, torch.inf).amin(dim=1)
    return (highest <= lowest).double().mean()
