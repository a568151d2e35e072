"""The job file's method sections, one per `method.kind`: what each objective takes, and the data it reads."""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GRPOLossType = Literal["grpo", "dr_grpo", "dapo"]
RewardScaling = Literal["group", "batch", "none"]
TrainOn = Literal["completion", "last_turn", "all"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
GRPO_LOSSES: tuple[str, ...] = get_args(GRPOLossType)
REWARD_SCALINGS: tuple[str, ...] = get_args(RewardScaling)

# `path/to/file.py:name` or `package.module:name`: a reward function's source, then its name there.
REWARD_FUNCTION = re.compile(r"^(?P<source>[^:]+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


class Section(BaseModel):
    """Base of every section: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SFTMethod(Section):
    """Supervised fine-tuning: next-token loss on prompt/completion or chat data."""

    kind: Literal["sft"] = Field("sft", description="Supervised fine-tuning (formats alpaca, chat, sharegpt, text)")
    train_on: TrainOn = Field(
        "completion",
        description=(
            "Which tokens carry loss: the completion (default; every assistant turn of a conversation), "
            "last_turn (only a conversation's final assistant answer), or all (the whole text). "
            "Tool results never carry loss but under all"
        ),
    )


class PretrainMethod(Section):
    """Continued pretraining: next-token loss on every token of raw text."""

    kind: Literal["pretrain"] = Field(description="Next-token prediction on raw text (format text)")


class DPOMethod(Section):
    """Direct preference optimisation on chosen/rejected pairs against a frozen reference model."""

    kind: Literal["dpo"] = Field(description="Direct preference optimisation (format preference)")
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference model; higher stays closer"
    )
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid (the DPO paper), ipo, or hinge (SLiC)"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed share of flipped preference labels (conservative DPO; sigmoid loss only)",
    )
    reference: Literal["auto", "precompute"] = Field(
        "auto",
        description="Reference log-probabilities: auto (computed during training) or precompute (one pass before training)",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the NLL of chosen (per answer token) added to the loss (RPO; TRL's rpo_alpha); 0: none",
    )


class ORPOMethod(Section):
    """Odds-ratio preference optimisation: SFT on chosen plus an odds-ratio term; no reference model."""

    kind: Literal["orpo"] = Field(description="SFT on chosen + odds-ratio term, no reference model (format preference)")
    beta: float = Field(
        0.1, gt=0, description="Weight of the odds-ratio term against the NLL of chosen (TRL's beta, the paper's λ)"
    )


class SimPOMethod(Section):
    """SimPO: a margin of length-normalised log-probabilities, chosen over rejected; no reference model."""

    kind: Literal["simpo"] = Field(description="Length-normalised preference margin, no reference model (format preference)")
    beta: float = Field(2.0, gt=0, description="Scale of the margin of per-token log-probabilities, chosen minus rejected")
    gamma: float = Field(
        0.5, ge=0, description="Target reward margin the scaled margin must exceed (TRL's simpo_gamma, the paper's γ)"
    )


class KTOMethod(Section):
    """Kahneman-Tversky optimisation on unpaired thumbs-up / thumbs-down completions, against a reference model."""

    kind: Literal["kto"] = Field(description="Kahneman-Tversky optimisation (format feedback)")
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference model; higher stays closer"
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="Weight of the desirable (label: true) completions' losses"
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="Weight of the undesirable (label: false) completions' losses"
    )
    reference: Literal["auto", "precompute"] = Field(
        "auto",
        description="Reference log-probabilities: auto (computed during training) or precompute (one pass before training)",
    )


class RewardMethod(Section):
    """Reward modelling: a scalar head trained so chosen answers score above rejected ones."""

    kind: Literal["reward"] = Field(description="Reward model training (format preference)")


class GenerationSpec(Section):
    """Extra settings of the rollouts' generation (TRL's generation_kwargs); unset ones keep the model's."""

    min_new_tokens: int | None = Field(
        None, ge=0, description="Tokens each completion has at least before EOS may end it"
    )
    top_k: int | None = Field(
        None, ge=0, description="Sample only from the k most likely tokens (0: no limit)"
    )
    repetition_penalty: float | None = Field(
        None, gt=0, description="Divide the scores of tokens already in the sequence by this (1: none)"
    )


class RewardSpec(Section):
    """One reward: a Python function or a sequence-classification model, and its weight in the total."""

    function: str | None = Field(
        None,
        description=(
            "A function with TRL's signature fn(prompts, completions, **columns) -> list[float | None]: "
            "path/to/file.py:name (relative to the job file) or package.module:name"
        ),
    )
    model: str | None = Field(
        None,
        description="A sequence-classification model directory (e.g. a sharpen reward run's final/) or hub id",
    )
    weight: float = Field(1.0, description="Weight of this reward in the weighted sum of rewards")

    @field_validator("function")
    @classmethod
    def _source_and_name(cls, v: str | None) -> str | None:
        if v is not None and not REWARD_FUNCTION.match(v):
            raise ValueError("write it as path/to/file.py:name or package.module:name")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of function (a Python callable) or model (a reward model)")
        return self


class GRPOMethod(Section):
    """Online RL (GRPO): sample a group of completions per prompt, score them, push up the better ones."""

    kind: Literal["grpo"] = Field(description="Group relative policy optimisation (format prompt)")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt: one group")
    max_completion_length: int = Field(256, ge=1, description="Most tokens generated per completion")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set of this mass")
    generation_kwargs: GenerationSpec = Field(
        default_factory=GenerationSpec,
        description="More generation settings, as TRL's: min_new_tokens, top_k, repetition_penalty",
    )
    beta: float = Field(
        0.0, ge=0, description="Weight of the KL to the reference model (k3 estimator); 0: no reference is held"
    )
    loss: GRPOLossType = Field(
        "dapo",
        description=(
            "How token losses are averaged: grpo (per completion, then over completions), dr_grpo (over "
            "completions x max_completion_length), dapo (over the step's completion tokens)"
        ),
    )
    epsilon: float = Field(0.2, gt=0, description="Clip range of the probability ratio (lower side, and upper by default)")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip range (DAPO's clip-higher); null: the same as epsilon"
    )
    scale_rewards: RewardScaling = Field(
        "group",
        description="Divide advantages by the reward std of the group, of the whole batch, or not at all (Dr. GRPO)",
    )
    num_iterations: int = Field(
        1, ge=1, description="Updates per generated batch; above 1 the loss uses the ratio to the policy that generated"
    )
    rewards: list[RewardSpec] = Field(
        min_length=1, description="Rewards summed by weight: [{function: rewards.py:name}, {model: DIR, weight: 0.5}]"
    )
    generation_gather: Literal["auto", "rollout", "forward"] = Field(
        "auto",
        description=(
            "Under fsdp and zero3: gather the whole model once per rollout (faster) or per forward (less memory); "
            "auto: once per rollout where the plan finds room"
        ),
    )


Method = Annotated[
    SFTMethod | PretrainMethod | DPOMethod | RewardMethod | GRPOMethod | KTOMethod | ORPOMethod | SimPOMethod,
    Field(discriminator="kind"),
]
# The data formats each method reads (the default: the supervised formats); one copy, for the rules and messages.
SUPERVISED_FORMATS = ("alpaca", "chat", "sharegpt", "text")
METHOD_FORMATS = {"dpo": ("preference",), "reward": ("preference",), "pretrain": ("text",), "grpo": ("prompt",),
                  "kto": ("feedback",)}
METHOD_FORMATS |= {"orpo": ("preference",), "simpo": ("preference",)}
# The methods whose rows are (chosen, rejected) pairs: a row is two sequences, the step's count is pairs.
PAIR_METHODS = frozenset(kind for kind, formats in METHOD_FORMATS.items() if "preference" in formats)
# The methods whose loss adds a mixture-of-experts model's router load-balancing loss
# (training/methods/causal_lm.py); the others train an MoE model without it.
ROUTER_LOSS_METHODS = ("sft", "pretrain")
# The methods whose rows can be split over ranks (strategy.sequence_parallel): one causal sequence per row and a
# loss summed over its label tokens, which each chunk adds its share of.
SEQUENCE_PARALLEL_METHODS = ("sft", "pretrain")
