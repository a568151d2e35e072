"""Training methods as losses over a micro-batch. Each returns a *sum*; the loop divides by the step's
global count (label tokens for SFT and pretraining, pairs for DPO, ORPO, SimPO and reward models), so
accumulation and ranks never skew the mean. One file a method; base.py holds what they share."""

from __future__ import annotations

# The method kinds a rank can train.
TRAINED_KINDS = ("sft", "pretrain", "reward", "dpo", "grpo", "kto")
TRAINED_KINDS += ("orpo", "simpo")  # reference-free preference methods


def create_method(kind: str, settings=None, reference=None, **context):
    """The loss of method `kind`. DPO also takes its method section and its reference (training/methods/dpo.py)."""
    if kind in ("sft", "pretrain"):
        from training.methods.causal_lm import CausalLMLoss

        return CausalLMLoss()
    if kind == "reward":
        from training.methods.reward import RewardLoss

        return RewardLoss()
    if kind == "dpo":
        from training.methods.dpo import DPOLoss

        return DPOLoss(reference, settings.beta, settings.loss, settings.label_smoothing, settings.sft_weight)
    if kind == "orpo":  # no reference: the policy's own chosen against rejected
        from training.methods.orpo import ORPOLoss

        return ORPOLoss(settings.beta)
    if kind == "simpo":  # no reference
        from training.methods.simpo import SimPOLoss

        return SimPOLoss(settings.beta, settings.gamma)
    if kind == "grpo":  # its step batches come from training/rollout/steps.py
        from training.methods.grpo import GRPOLoss

        s = settings
        return GRPOLoss(s.loss, s.epsilon, s.epsilon_high, s.beta, s.temperature, s.num_iterations)
    if kind == "kto":  # `context`: the rows' labels and the KL pairs' batching (training/methods/kto.py build_kto_loss)
        from training.methods.kto import KTOLoss

        s = settings
        return KTOLoss(reference, s.beta, s.desirable_weight, s.undesirable_weight, **context)
    raise ValueError(f"method {kind!r} is not available in this version")
