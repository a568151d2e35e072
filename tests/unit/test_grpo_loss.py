"""GRPO's objective in one process: the advantages, each loss type, the clipping (num_iterations 2) and the
k3 term against hand computations on a fixed step of completions, and the step's loss and gradients the
same whether it runs as 1, 2 or 4 micro-batches.

The hand side never packs: it runs the model on each prompt + completion alone and walks the tokens in
Python, so packing, label alignment, logit slicing and the per-step normalisation are all under test."""

from __future__ import annotations

import copy
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from training.methods.grpo import (
    CompletionCounts,
    GRPOLoss,
    collate_completions,
    completion_micro_batches,
)
from training.methods.grpo_advantages import group_advantages

VOCAB = 32
MAX_COMPLETION = 6
NUM_GENERATIONS = 4
# Two prompts, four completions each (prompt-major), of uneven lengths: per-sequence and per-token
# normalisation give different losses here.
PROMPTS = [[1, 5, 9], [2, 7]]
COMPLETIONS = [
    [4, 8, 3],
    [11],
    [6, 6, 20, 13, 2],
    [17, 3],
    [9, 21, 4, 30],
    [12, 5, 5, 18, 27, 2],
    [3, 3],
    [25, 14, 7],
]
PROMPT_OF = [PROMPTS[i // NUM_GENERATIONS] for i in range(len(COMPLETIONS))]
REWARDS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 1.0, 0.0]
COUNTS = CompletionCounts.of([len(c) for c in COMPLETIONS], MAX_COMPLETION)
DIVISORS = {
    "dapo": sum(map(len, COMPLETIONS)),
    "grpo": len(COMPLETIONS),
    "dr_grpo": len(COMPLETIONS) * MAX_COMPLETION,
}


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked distributions: another weight state moves the ratios well off 1
    )
    return LlamaForCausalLM(config).float()


def shifted(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """A copy of `model` with every weight moved by noise: another policy state (old, or reference)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1))
    return other


def hand_logps(
    model: nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> list[torch.Tensor]:
    """log p(completion[k] | prompt, completion[:k]) at `temperature`, the sequence run alone."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0]
    out = []
    for k, token in enumerate(completion):
        row = logits[len(prompt) - 1 + k] / temperature
        out.append(row[token] - torch.logsumexp(row, dim=0))
    return out


def hand_advantages(rewards: list[float], scale: str) -> list[float]:
    out = []
    for g in range(0, len(rewards), NUM_GENERATIONS):
        group = rewards[g : g + NUM_GENERATIONS]
        mean = statistics.mean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(rewards), "none": None}[scale]
        out += [(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group]
    return out


def hand_step(model, advantages, loss_type, *, old=None, ref=None, beta=0.0, eps=(0.2, 0.2), temperature=1.0):
    """(the step's loss as a tensor with gradient, {metric: token mean}) walked token by token."""
    total, tokens = 0.0, 0
    low = high = kl_sum = entropy_sum = 0.0
    for i, (prompt, completion) in enumerate(zip(PROMPT_OF, COMPLETIONS, strict=True)):
        logps = hand_logps(model, prompt, completion, temperature)
        sequence = 0.0
        for k, logp in enumerate(logps):
            a = advantages[i]
            old_logp = logp.detach() if old is None else old[i][k]
            ratio = torch.exp(logp - old_logp)
            clipped = torch.clamp(ratio, 1 - eps[0], 1 + eps[1])
            term = -torch.minimum(ratio * a, clipped * a)
            if beta > 0:
                d = ref[i][k] - logp
                kl = torch.exp(d) - d - 1
                term = term + beta * kl
                kl_sum += float(kl.detach())
            low += float(ratio.detach()) < 1 - eps[0] and a < 0
            high += float(ratio.detach()) > 1 + eps[1] and a > 0
            sequence = sequence + term
            tokens += 1
        total = total + (sequence / len(completion) if loss_type == "grpo" else sequence)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0] / temperature
            for k in range(len(completion)):
                probs = torch.softmax(logits[len(prompt) - 1 + k], dim=0)
                entropy_sum -= float((probs * probs.log()).sum())
    metrics = {
        "clip_ratio/low": low / tokens,
        "clip_ratio/high": high / tokens,
        "entropy": entropy_sum / tokens,
    }
    metrics["clip_ratio/region"] = (low + high) / tokens
    if beta > 0:
        metrics["kl"] = kl_sum / tokens
    return total / DIVISORS[loss_type], metrics


def run_step(loss: GRPOLoss, model, micro_batches) -> tuple[float, torch.Tensor, dict[str, float]]:
    """As the loop runs a step: backward of each micro-batch's sum over the step's count; (loss, grads, metrics)."""
    model.zero_grad()
    loss_sum, metric_sums = 0.0, {}
    for micro in micro_batches:
        out = loss(model, micro)
        (out.loss_sum / getattr(COUNTS, loss.normaliser)).backward()
        loss_sum += float(out.loss_sum.detach())
        for name, value in out.metric_sums.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
    metrics = {name: value / getattr(COUNTS, loss.metric_normaliser) for name, value in metric_sums.items()}
    return loss_sum / getattr(COUNTS, loss.normaliser), grads(model), metrics


def grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def hand_grads(model, hand_loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    hand_loss.backward()
    return grads(model)


def step_batches(advantages, micro_batch_size=len(COMPLETIONS), **per_token):
    return completion_micro_batches(
        PROMPT_OF, COMPLETIONS, torch.tensor(advantages), micro_batch_size, **per_token
    )


def detached(logps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(seq).detach() for seq in logps]


def other_logps(model, temperature=1.0) -> list[torch.Tensor]:
    return detached(
        [hand_logps(model, p, c, temperature) for p, c in zip(PROMPT_OF, COMPLETIONS, strict=True)]
    )


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_of_each_scaling_match_the_hand_computation(scale):
    result = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), NUM_GENERATIONS, scale)
    assert result.values.tolist() == pytest.approx(hand_advantages(REWARDS, scale), abs=1e-12)
    # The first group [1, 0, .5, 1]: mean .625, sample std .4787 (TRL's unbiased torch.std, not .4146).
    first = {"group": 0.375 / (0.47871355387816905 + 1e-4), "none": 0.375}
    if scale in first:
        assert float(result.values[0]) == pytest.approx(first[scale], abs=1e-12)


def test_share_of_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    result = group_advantages(rewards, NUM_GENERATIONS, "group")
    assert float(result.all_equal_share) == pytest.approx(2 / 3)
    assert result.values[:4].tolist() == [0.0] * 4 and result.values[8:].tolist() == [0.0] * 4
    assert float(group_advantages(rewards, NUM_GENERATIONS, "none").all_equal_share) == pytest.approx(2 / 3)


def test_an_unscored_completion_is_left_out_of_its_group_and_gets_no_advantage():
    rewards = torch.tensor([1.0, math.nan, 3.0, 2.0, math.nan, math.nan, math.nan, 5.0])
    values = group_advantages(rewards, NUM_GENERATIONS, "group").values.tolist()
    std = statistics.stdev([1.0, 3.0, 2.0])
    assert values[:4] == pytest.approx([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0], abs=1e-6)
    assert values[4:] == [0.0] * 4  # one scored completion: no std, nothing to learn from the group


def test_rewards_that_are_not_whole_groups_are_refused():
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_advantages(torch.ones(6), NUM_GENERATIONS, "group")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(8), NUM_GENERATIONS, "std")


# ---------------------------------------------------------------- the micro-batch


def test_a_micro_batch_labels_exactly_the_completion_tokens_in_order():
    advantages = torch.tensor(hand_advantages(REWARDS, "group"))
    micro = collate_completions(PROMPT_OF, COMPLETIONS, advantages, old_logps=other_logps(tiny_llama()))
    labels = micro.labels[0]
    assert labels[labels != -100].tolist() == [t for c in COMPLETIONS for t in c]
    assert micro.num_samples == 8 and micro.old_logps.shape == (COUNTS.global_completion_tokens,)
    moved = micro.to("cpu", dtype=torch.float32)  # what run_forward does: the GRPO fields travel along
    assert torch.equal(moved.advantages, advantages) and torch.equal(moved.old_logps, micro.old_logps)
    with pytest.raises(ValueError, match="old_logps"):
        collate_completions(PROMPT_OF, COMPLETIONS, advantages, old_logps=[torch.zeros(2)] * 8)


# ---------------------------------------------------------------- the loss against the hand


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_on_policy_loss_and_gradients_of_each_loss_type_match_the_hand(loss_type, scale):
    model, advantages = tiny_llama(), hand_advantages(REWARDS, scale)
    loss, grad, metrics = run_step(GRPOLoss(loss_type), model, step_batches(advantages))
    hand, hand_metrics = hand_step(model, advantages, loss_type)
    assert loss == pytest.approx(float(hand.detach()), abs=1e-6)
    torch.testing.assert_close(grad, hand_grads(model, hand), atol=1e-6, rtol=1e-5)
    assert metrics == pytest.approx(hand_metrics, abs=1e-6)
    # On-policy the ratio is 1: the loss is minus the advantages, weighted as the loss type weights tokens.
    weight = {
        "dapo": [len(c) for c in COMPLETIONS],
        "grpo": [1] * 8,
        "dr_grpo": [len(c) for c in COMPLETIONS],
    }
    assert loss == pytest.approx(
        -sum(a * w for a, w in zip(advantages, weight[loss_type], strict=True)) / DIVISORS[loss_type],
        abs=1e-6,
    )
    assert metrics["clip_ratio/region"] == 0.0


def test_temperature_divides_the_logits_as_sampling_did():
    model, advantages = tiny_llama(), hand_advantages(REWARDS, "group")
    old = other_logps(shifted(model, 1, 0.3), temperature=0.7)
    loss, grad, metrics = run_step(
        GRPOLoss("dapo", temperature=0.7, num_iterations=2), model, step_batches(advantages, old_logps=old)
    )
    hand, hand_metrics = hand_step(model, advantages, "dapo", old=old, temperature=0.7)
    assert loss == pytest.approx(float(hand.detach()), abs=1e-6)
    torch.testing.assert_close(grad, hand_grads(model, hand), atol=1e-6, rtol=1e-5)
    assert metrics["entropy"] == pytest.approx(hand_metrics["entropy"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_clipping_with_two_iterations_matches_the_hand(loss_type):
    model, advantages = tiny_llama(), hand_advantages(REWARDS, "group")
    old = other_logps(shifted(model, 3, 0.2))  # the policy that generated, one update ago
    eps = (0.2, 0.28)  # DAPO's clip-higher: the two sides differ
    method = GRPOLoss(loss_type, epsilon=eps[0], epsilon_high=eps[1], num_iterations=2)
    loss, grad, metrics = run_step(method, model, step_batches(advantages, old_logps=old))
    hand, hand_metrics = hand_step(model, advantages, loss_type, old=old, eps=eps)
    # The fixture is one where the clip is active on some tokens of each side, and not on every token.
    assert 0 < hand_metrics["clip_ratio/low"] and 0 < hand_metrics["clip_ratio/high"]
    assert hand_metrics["clip_ratio/region"] < 0.8
    assert loss == pytest.approx(float(hand.detach()), abs=1e-6)
    torch.testing.assert_close(grad, hand_grads(model, hand), atol=1e-6, rtol=1e-5)
    assert metrics == pytest.approx(hand_metrics, abs=1e-6)
    # Against the unclipped objective the gradient differs: the clipped tokens pass none.
    unclipped = GRPOLoss(loss_type, epsilon=10.0, num_iterations=2)
    assert not torch.allclose(
        run_step(unclipped, model, step_batches(advantages, old_logps=old))[1], grad, atol=1e-4
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_beta_adds_exactly_beta_times_k3(loss_type):
    model, advantages = tiny_llama(), hand_advantages(REWARDS, "group")
    ref = other_logps(shifted(model, 2, 0.3))
    beta = 0.04
    without, grad_without, _ = run_step(GRPOLoss(loss_type), model, step_batches(advantages))
    with_kl, grad_with, metrics = run_step(
        GRPOLoss(loss_type, beta=beta), model, step_batches(advantages, ref_logps=ref)
    )
    # k3 by hand: exp(ref - logp) - (ref - logp) - 1 per token, weighted as the loss type weights tokens.
    k3_term, k3_tokens = 0.0, []
    for i, (prompt, completion) in enumerate(zip(PROMPT_OF, COMPLETIONS, strict=True)):
        logps = hand_logps(model, prompt, completion, 1.0)
        ks = [torch.exp(ref[i][k] - lp) - (ref[i][k] - lp) - 1 for k, lp in enumerate(logps)]
        k3_tokens += [float(k.detach()) for k in ks]
        k3_term = k3_term + (sum(ks) / len(ks) if loss_type == "grpo" else sum(ks))
    k3_term = k3_term / DIVISORS[loss_type]
    assert with_kl - without == pytest.approx(beta * float(k3_term), abs=1e-7)
    assert metrics["kl"] == pytest.approx(sum(k3_tokens) / len(k3_tokens), abs=1e-7)
    assert min(k3_tokens) >= 0 and metrics["kl"] > 1e-3  # k3 is never negative; this reference differs
    torch.testing.assert_close(
        grad_with - grad_without, beta * hand_grads(model, k3_term), atol=1e-6, rtol=1e-5
    )


def test_a_model_without_logits_to_keep_gives_the_same_loss():
    """The full-logits path: a bigram model (logits depend on the current token only) that is no
    transformers model, so every position's logits are computed and the label positions picked."""

    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.table = nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids, **_):
            return SimpleNamespace(logits=self.table(input_ids))

    model, advantages = Bigram(), hand_advantages(REWARDS, "batch")
    old = other_logps(shifted(model, 4, 0.5))
    loss, grad, _ = run_step(
        GRPOLoss("dapo", num_iterations=2), model, step_batches(advantages, old_logps=old)
    )
    hand, _ = hand_step(model, advantages, "dapo", old=old)
    assert loss == pytest.approx(float(hand.detach()), abs=1e-6)
    torch.testing.assert_close(grad, hand_grads(model, hand), atol=1e-6, rtol=1e-5)


def test_missing_inputs_are_named():
    model, advantages = tiny_llama(), hand_advantages(REWARDS, "group")
    (micro,) = step_batches(advantages)
    with pytest.raises(ValueError, match="ref_logps"):
        GRPOLoss(beta=0.1)(model, micro)
    with pytest.raises(ValueError, match="old_logps"):
        GRPOLoss(num_iterations=2)(model, micro)
    with pytest.raises(ValueError, match="one of"):
        GRPOLoss("bnpo")


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_the_step_is_the_same_in_one_two_or_four_micro_batches(loss_type):
    model, advantages = tiny_llama(), hand_advantages(REWARDS, "group")
    old, ref = other_logps(shifted(model, 1, 0.6)), other_logps(shifted(model, 2, 0.3))
    method = GRPOLoss(loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.04, num_iterations=2)
    runs = [
        run_step(method, model, step_batches(advantages, size, old_logps=old, ref_logps=ref))
        for size in (8, 4, 2)
    ]
    (loss, grad, metrics), *others = runs
    assert metrics["clip_ratio/region"] > 0  # the clip is active: the exactness covers it
    for other_loss, other_grad, other_metrics in others:
        assert other_loss == pytest.approx(loss, abs=1e-6)
        torch.testing.assert_close(other_grad, grad, atol=1e-6, rtol=0)
        assert other_metrics == pytest.approx(metrics, abs=1e-6)
    # The old and reference log-probabilities the method computes itself, per micro-batch, are the hand's.
    halves = step_batches(advantages, 4)
    old_model = shifted(model, 1, 0.6)
    mine = torch.cat([method.token_logps(old_model, micro) for micro in halves])
    torch.testing.assert_close(mine, torch.cat(old), atol=1e-5, rtol=0)


def test_the_reference_of_a_lora_policy_is_its_adapter_disabled():
    """LoRA/QLoRA hold no second model: the reference log-probabilities are the policy's with the adapter
    off, through the same `token_logps` (PEFT passes logits_to_keep on)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    expected = torch.cat(other_logps(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(base), config)
    method, (micro,) = GRPOLoss(beta=0.04), step_batches(hand_advantages(REWARDS, "group"))
    with policy.disable_adapter():
        reference = method.token_logps(policy, micro)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    assert (method.token_logps(policy, micro) - expected).abs().max() > 1e-3  # the adapter does change them
