"""Rollouts (training/rollout/generate.py): a row's completion depends only on its prompt, its key and the
model; the KV-cache path decodes what a plain forward would; the logits processors are transformers'."""

from __future__ import annotations

import hashlib
import math
import random

import pydantic
import pytest
import torch
from torch import nn

from training.rollout.generate import (
    Completions,
    SamplingSettings,
    generate,
    group_keys,
    process_logits,
    row_seed,
    sample_tokens,
)

PAD, EOS = 0, 2  # training/tiny.py's special tokens: <pad>, <s>, </s>
EOS_IDS = torch.tensor([EOS])


def load(path, attention: str = "sdpa") -> nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False  # as training/model.py leaves it: generate must turn the cache on itself
    return model


@pytest.fixture(scope="module")
def model(tiny_model):
    return load(tiny_model)


@pytest.fixture(scope="module")
def prompts(model):
    rng = random.Random(0)
    vocab = model.config.vocab_size
    return [[rng.randrange(8, vocab) for _ in range(n)] for n in (3, 11, 6, 1, 8, 5)]


def keys_for(prompts, seed=0, step=0):
    return [(seed, step, i, 0) for i in range(len(prompts))]


def greedy_reference(model, prompt, length):
    """Argmax decode of one unpadded row, a full forward per token and no cache."""
    ids = list(prompt)
    for _ in range(length):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == EOS:
            break
    return ids[len(prompt):]


def eos_heavy(path, bias: float = 6.0) -> nn.Module:
    """The tiny model with an lm_head bias that makes EOS about half of each step's probability mass."""
    model = load(path)
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = bias
    model.lm_head = head
    return model


# -- seeds --------------------------------------------------------------------------------------------


def test_row_seed_is_a_stable_hash_of_the_key():
    """Pinned: changing the hash would silently change every run's completions (and break resumes)."""
    want = int.from_bytes(hashlib.sha256(b"0,3,17,5").digest()[:8], "little") >> 1
    assert row_seed((0, 3, 17, 5)) == want == 15871455353583300
    assert len({row_seed((0, 0, p, g)) for p in range(50) for g in range(8)}) == 400


def test_group_keys_give_each_prompt_its_group():
    assert group_keys(7, 3, [10, 4], 2) == [(7, 3, 10, 0), (7, 3, 10, 1), (7, 3, 4, 0), (7, 3, 4, 1)]


# -- logits processing against hand computations and transformers' processors -------------------------


def settings(**kw) -> SamplingSettings:
    return SamplingSettings(max_completion_length=kw.pop("max_completion_length", 8), **kw)


def kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest_and_their_ties():
    scores = torch.tensor([[5.0, 4.0, 1.0, 4.0, 0.0]])
    assert kept(process_logits(scores, settings(top_k=1), 0, EOS_IDS)) == [0]
    assert kept(process_logits(scores, settings(top_k=2), 0, EOS_IDS)) == [0, 1, 3]  # a tie at the k-th stays
    assert kept(process_logits(scores, settings(top_k=0), 0, EOS_IDS)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.05, 0.3, 0.15]
    scores = torch.tensor([probs]).log()
    # most likely first: 0.5 < 0.75, 0.5 + 0.3 = 0.8 >= 0.75: tokens 0 and 2
    assert kept(process_logits(scores, settings(top_p=0.75), 0, EOS_IDS)) == [0, 2]
    assert kept(process_logits(scores, settings(top_p=0.4), 0, EOS_IDS)) == [0]
    assert kept(process_logits(scores, settings(top_p=0.9), 0, EOS_IDS)) == [0, 2, 3]
    out = process_logits(scores, settings(top_p=0.75), 0, EOS_IDS)
    assert torch.equal(out[0, [0, 2]], scores[0, [0, 2]])  # kept logits are untouched


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(scores, settings(repetition_penalty=2.0), 0, EOS_IDS, seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_min_new_tokens_masks_eos_until_n_tokens_and_temperature_divides():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    s = settings(min_new_tokens=2, temperature=0.5)
    assert process_logits(scores, s, 1, EOS_IDS).tolist() == [[2.0, 4.0, -math.inf, 8.0]]
    assert process_logits(scores, s, 2, EOS_IDS).tolist() == [[2.0, 4.0, 6.0, 8.0]]


def test_the_processors_match_transformers_in_its_order():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 64, generator=g) * 3
    history = torch.randint(0, 64, (4, 10), generator=g)  # 6 prompt tokens + 4 generated
    history[:, 6] = EOS  # an EOS in the history: penalised too
    s = settings(temperature=0.7, top_k=20, top_p=0.8, min_new_tokens=5, repetition_penalty=1.3)
    hf = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.3),
        MinNewTokensLengthLogitsProcessor(6, 5, EOS),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ])
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, history, True)
    ours = process_logits(scores, s, 4, EOS_IDS, seen)
    want = hf(history, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(want))
    assert torch.allclose(ours[torch.isfinite(ours)], want[torch.isfinite(want)], rtol=0, atol=1e-6)
    assert (torch.isfinite(ours).sum(dim=1) < 20).all()  # top_p cut further than top_k here


def test_sampling_inverts_the_cdf_and_skips_impossible_tokens():
    scores = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).log().repeat(4, 1)  # token 1: probability 0
    tokens, logp = sample_tokens(scores, torch.tensor([0.05, 0.1001, 0.69, 0.99], dtype=torch.float64))
    assert tokens.tolist() == [0, 2, 2, 3]
    assert torch.allclose(logp, torch.tensor([0.1, 0.6, 0.6, 0.3]).log())
    # A draw of exactly 0 where the first token is impossible takes the first possible one.
    first_impossible = torch.tensor([[0.0, 0.0, 0.7, 0.3]]).log()
    assert sample_tokens(first_impossible, torch.tensor([0.0], dtype=torch.float64))[0].tolist() == [2]


def test_sampling_draws_the_distribution():
    probs = torch.tensor([0.5, 0.2, 0.2, 0.1])
    n = 40000
    tokens, _ = sample_tokens(probs.log().repeat(n, 1), torch.rand(n, generator=torch.Generator().manual_seed(0),
                                                                   dtype=torch.float64))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.01)


# -- the decode loop on the tiny model ---------------------------------------------------------------


def test_top_k_1_is_the_greedy_decode_of_a_plain_forward(model, prompts):
    """Left padding, position ids and the KV cache give what a full forward of each row alone gives,
    with config.use_cache False as training leaves it; the model's training mode is restored."""
    model.train()
    out = generate(model, prompts, keys_for(prompts), settings(top_k=1, max_completion_length=12), PAD, EOS)
    assert model.training
    model.eval()
    assert out.token_ids == [greedy_reference(model, p, 12) for p in prompts]


@pytest.mark.parametrize("how", [{}, {"top_p": 0.9, "top_k": 50, "repetition_penalty": 1.3, "temperature": 0.8}])
def test_a_row_gives_the_same_completion_in_any_batch(model, prompts, how):
    s = settings(max_completion_length=16, **how)
    keys = keys_for(prompts, seed=3, step=5)
    together = generate(model, prompts, keys, s, PAD, EOS)
    alone = [generate(model, [p], [k], s, PAD, EOS).token_ids[0] for p, k in zip(prompts, keys, strict=True)]
    assert together.token_ids == alone
    # Shuffled, among other rows (a longer prompt changes everyone's padding), in a batch of 9.
    rng = random.Random(1)
    others = [[rng.randrange(8, model.config.vocab_size) for _ in range(n)] for n in (20, 2, 4)]
    rows = list(zip(prompts, keys, strict=True)) + [(o, (9, 9, i, 0)) for i, o in enumerate(others)]
    rng.shuffle(rows)
    mixed = generate(model, [p for p, _ in rows], [k for _, k in rows], s, PAD, EOS)
    by_key = dict(zip([k for _, k in rows], mixed.token_ids, strict=True))
    assert [by_key[k] for k in keys] == together.token_ids
    assert all(len(ids) == 16 for ids in together.token_ids)


def test_a_different_key_gives_a_different_completion(model, prompts):
    s = settings(max_completion_length=16)
    prompt = prompts[1]
    group = generate(model, [prompt] * 4, group_keys(0, 0, [1], 4), s, PAD, EOS).token_ids
    assert len({tuple(ids) for ids in group}) == 4  # a group's generations differ
    again = generate(model, [prompt], [(0, 0, 1, 2)], s, PAD, EOS).token_ids[0]
    assert again == group[2]
    next_step = generate(model, [prompt], [(0, 1, 1, 2)], s, PAD, EOS).token_ids[0]
    assert next_step != group[2]


def test_max_completion_length_cuts_and_says_so(model, prompts):
    out = generate(model, prompts, keys_for(prompts), settings(max_completion_length=5), PAD, EOS)
    assert [len(ids) for ids in out.token_ids] == [5] * len(prompts)
    assert out.truncated == [True] * len(prompts) and out.ended_by_eos == [False] * len(prompts)
    assert out.num_tokens == 5 * len(prompts)


def test_eos_ends_a_row_and_is_kept(tiny_model, prompts):
    model = eos_heavy(tiny_model)
    many = prompts * 4
    keys = [(0, 0, i, 0) for i in range(len(many))]
    out = generate(model, many, keys, settings(max_completion_length=6), PAD, EOS)
    for ids, ended in zip(out.token_ids, out.ended_by_eos, strict=True):
        assert (ids[-1] == EOS) == ended and EOS not in ids[:-1]
        assert ended or len(ids) == 6
    assert any(out.ended_by_eos) and any(out.truncated)
    assert min(len(ids) for ids in out.token_ids) < 3  # EOS is likely: some rows stop early


def test_min_new_tokens_suppresses_eos_before_n_tokens(tiny_model, prompts):
    model = eos_heavy(tiny_model)
    many = prompts * 4
    keys = [(0, 0, i, 0) for i in range(len(many))]
    free = generate(model, many, keys, settings(max_completion_length=8), PAD, EOS)
    held = generate(model, many, keys, settings(max_completion_length=8, min_new_tokens=4), PAD, EOS)
    assert any(len(ids) < 4 for ids in free.token_ids)  # without it, EOS comes early
    assert all(len(ids) >= 4 for ids in held.token_ids)
    assert all(EOS not in ids[:4] for ids in held.token_ids)
    assert any(held.ended_by_eos)  # and EOS is allowed from the 5th token on


def test_repetition_penalty_reaches_the_loop(model, prompts):
    """A huge penalty with greedy picks: no token of the prompt or of the completion so far comes again."""
    s = settings(max_completion_length=12, top_k=1)
    plain = generate(model, prompts, keys_for(prompts), s, PAD, EOS)
    penalised = generate(model, prompts, keys_for(prompts), settings(max_completion_length=12, top_k=1,
                                                                      repetition_penalty=1e4), PAD, EOS)
    def repeats(prompt, ids):
        return len(set(prompt + ids)) < len(set(prompt)) + len(ids)
    assert any(repeats(p, ids) for p, ids in zip(prompts, plain.token_ids, strict=True))
    assert not any(repeats(p, ids) for p, ids in zip(prompts, penalised.token_ids, strict=True))


def test_logprobs_are_the_sampling_distributions(model, prompts):
    """With temperature alone they are a training forward's log_softmax(logits / T) up to float noise (not
    bit for bit: the cache path sums in another order); with top_k they are of the truncated distribution."""
    temperature = 0.7
    out = generate(model, prompts, keys_for(prompts), settings(max_completion_length=10, temperature=temperature),
                   PAD, EOS, return_logprobs=True)
    cut = generate(model, prompts, keys_for(prompts), settings(max_completion_length=10, temperature=temperature,
                                                                top_k=5), PAD, EOS, return_logprobs=True)
    rows = zip(prompts, out.token_ids, out.logprobs, cut.token_ids, cut.logprobs, strict=True)
    for prompt, ids, logp, ids_k, logp_k in rows:
        assert logp.shape == (len(ids),)
        assert torch.allclose(logp, tempered_logprobs(model, prompt, ids, temperature), rtol=0, atol=1e-5)
        full = tempered_logprobs(model, prompt, ids_k, temperature)
        assert (logp_k > full + 1e-3).all()  # renormalised over 5 tokens out of the vocabulary


def tempered_logprobs(model, prompt, ids, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def test_attention_kernels_decode_alike(tiny_model, model, prompts):
    """sharpen's sdpa kernel (training/kernels/attention.py, as training loads models) and eager attention
    sample the same completions as transformers' sdpa."""
    from training.kernels.attention import kernel_name

    s = settings(max_completion_length=10)
    want = generate(model, prompts, keys_for(prompts), s, PAD, EOS).token_ids
    for attention in (kernel_name("sdpa"), "eager"):
        assert generate(load(tiny_model, attention), prompts, keys_for(prompts), s, PAD, EOS).token_ids == want


def test_a_lora_model_generates_through_its_adapter_and_without_it_as_the_base(tiny_model, prompts):
    from peft import LoraConfig, get_peft_model

    s = settings(max_completion_length=10)
    base = load(tiny_model)
    want = generate(base, prompts, keys_for(prompts), s, PAD, EOS).token_ids
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))  # a non-zero adapter, as after training
    adapted = generate(lora, prompts, keys_for(prompts), s, PAD, EOS).token_ids
    assert adapted != want
    with lora.disable_adapter():
        assert generate(lora, prompts, keys_for(prompts), s, PAD, EOS).token_ids == want


def test_a_wrapped_model_generates_as_the_model(model, prompts):
    """Under a wrapper that holds the model as `.module` (torch's DataParallel here, DDP on ranks): the
    config and the cache keyword are read from the model inside, the forward is the wrapper's."""
    s = settings(max_completion_length=10)
    want = generate(model, prompts, keys_for(prompts), s, PAD, EOS, return_logprobs=True)
    wrapped = generate(nn.DataParallel(model), prompts, keys_for(prompts), s, PAD, EOS, return_logprobs=True)
    assert wrapped.token_ids == want.token_ids
    assert all(torch.equal(a, b) for a, b in zip(wrapped.logprobs, want.logprobs, strict=True))


# -- settings and inputs ------------------------------------------------------------------------------


def test_settings_come_from_a_method_section_and_refuse_what_the_loop_does_not_do():
    from launcher.method_spec import GRPOMethod

    rewards = [{"function": "rewards.py:correct"}]
    method = GRPOMethod(kind="grpo", max_completion_length=64, temperature=0.9, top_p=0.95, rewards=rewards,
                        generation_kwargs={"min_new_tokens": 3, "top_k": 40, "repetition_penalty": 1.1})
    assert SamplingSettings.from_method(method) == SamplingSettings(64, 0.9, 0.95, 40, 3, 1.1)
    plain = GRPOMethod(kind="grpo", max_completion_length=8, rewards=rewards)
    assert SamplingSettings.from_method(plain) == SamplingSettings(8)
    with pytest.raises(pydantic.ValidationError, match="num_beams"):
        GRPOMethod(kind="grpo", rewards=rewards, generation_kwargs={"num_beams": 4})
    for bad in ({"temperature": -0.5}, {"top_p": 0.0}, {"top_k": -1}, {"max_completion_length": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingSettings(**{"max_completion_length": 4, **bad})


def test_inputs_are_checked(model, prompts):
    with pytest.raises(ValueError, match="one key per row"):
        generate(model, prompts, keys_for(prompts)[:-1], settings(), PAD, EOS)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]], [(0,)], settings(), PAD, EOS)
    assert generate(model, [], [], settings(), PAD, EOS) == Completions([], [], None)


def test_padding_is_not_a_repeat(tiny_model, prompts):
    """The repetition penalty counts a row's own tokens: a padded row samples as it does alone, even where
    the pad token is likely (transformers would penalise the pads of padded rows)."""
    model = eos_heavy(tiny_model)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[PAD] = 6.0
    s = settings(max_completion_length=6, repetition_penalty=50.0)
    keys = keys_for(prompts)
    together = generate(model, prompts, keys, s, PAD, EOS).token_ids
    assert together == [generate(model, [p], [k], s, PAD, EOS).token_ids[0] for p, k in zip(prompts, keys, strict=True)]
    assert sum(ids.count(PAD) for ids in together) >= len(prompts) // 2  # the pad token is a likely first pick


def test_a_group_prefilled_once_gives_each_row_its_own_completion(model, prompts):
    """Rows of one prompt share one prefill (its cache copied to each): every row still gets what it
    would get alone, in groups laid prompt-major as GRPO lays them."""
    from training.rollout.generate import shared_prompts

    s = settings(max_completion_length=12, top_k=50)
    rows = [p for p in prompts[:3] for _ in range(4)]
    keys = group_keys(7, 2, [0, 1, 2], 4)
    assert shared_prompts(rows) == ([0, 4, 8], [0] * 4 + [1] * 4 + [2] * 4)
    together = generate(model, rows, keys, s, PAD, EOS).token_ids
    alone = [generate(model, [p], [k], s, PAD, EOS).token_ids[0] for p, k in zip(rows, keys, strict=True)]
    assert together == alone


def test_lora_merged_for_a_rollout_gives_the_adapters_logits_and_leaves_the_model_as_it_was(tiny_model):
    from peft import LoraConfig, get_peft_model

    from training.kernels.lora_fused import fuse_lora_linears
    from training.rollout.merged_lora import merged_lora

    lora = get_peft_model(load(tiny_model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # an adapter that changes the output
    fuse_lora_linears(lora)  # a kernel's own forward, which the merge must put back
    weights = {n: p.detach().clone() for n, p in lora.named_parameters()}
    forwards = {n: m.__dict__.get("forward") for n, m in lora.named_modules()}
    x = torch.randint(8, lora.config.vocab_size, (2, 9))
    with torch.no_grad():
        plain = lora(input_ids=x).logits
        with merged_lora(lora) as merged:
            inside = lora(input_ids=x).logits
        after = lora(input_ids=x).logits
        with lora.disable_adapter():
            base = lora(input_ids=x).logits
    assert merged == 7 * lora.config.num_hidden_layers  # q k v o gate up down
    assert torch.allclose(inside, plain, atol=1e-5) and (inside - base).abs().max() > 1e-3
    assert torch.equal(after, plain)
    assert all(torch.equal(p, weights[n]) for n, p in lora.named_parameters())
    assert {n: m.__dict__.get("forward") for n, m in lora.named_modules()} == forwards
