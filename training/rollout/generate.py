"""Sampled completions from a causal LM, each row seeded by its own key, so that a row's completion depends
only on its prompt, its key and the model: not on the batch it shares, the rank it runs on, or a resume.

transformers' `generate` draws every row's token from one global RNG, so a completion changes with what
else is in its batch. Here each row has its own torch.Generator, seeded from a stable hash of its key
(seed, step, prompt index, generation index), and spends one uniform draw per generated token on an
inverse-CDF sample of its own distribution. The batch is left-padded with an attention mask and position
ids (a row's logits do not depend on its padding) and decoded with transformers' DynamicCache.

The logits are processed as transformers' sampling does (TRL hands its GRPO settings to `generate`), in
its order: repetition penalty, min_new_tokens (EOS masked), temperature, top_k, top_p. One difference:
the repetition penalty counts a row's own prompt and completion tokens, never its padding (transformers
penalises the pad token in padded rows, which would make a row depend on its batch).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from launcher.method_spec import GRPOMethod
from training import heartbeat

# The generation_kwargs this decode loop implements (TRL passes these on to transformers' generate);
# anything else in a job's generation_kwargs is a job-file error, not something to drop silently.


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled: the job's method.max_completion_length, temperature, top_p and its
    generation_kwargs (top_k 0: off, as in transformers). Temperature 0 is greedy (`sharpen generate`;
    GRPO's schema refuses it): the likeliest token, with log-probability 0."""

    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.max_completion_length < 1:
            problems.append(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_method(cls, method: GRPOMethod) -> SamplingSettings:
        """The settings of a GRPO method section: max_completion_length, temperature, top_p, and the
        generation_kwargs it sets (the schema, launcher/method_spec.py GenerationSpec, refuses others)."""
        extra = method.generation_kwargs.model_dump(exclude_none=True)
        return cls(
            max_completion_length=method.max_completion_length,
            temperature=method.temperature,
            top_p=method.top_p,
            top_k=extra.get("top_k", 0),
            min_new_tokens=extra.get("min_new_tokens", 0),
            repetition_penalty=extra.get("repetition_penalty", 1.0),
        )


@dataclass(frozen=True)
class Completions:
    """Per row: the completion's token ids (its EOS kept, as TRL does), whether it ended by EOS (else it
    was cut at max_completion_length, or `stopped` by the caller's on_token), and, when asked for, the
    log-probability of each chosen token under the distribution it was sampled from (after every logits
    processor)."""

    token_ids: list[list[int]]
    ended_by_eos: list[bool]
    logprobs: list[torch.Tensor] | None = None
    stopped: bool = False  # on_token asked to stop before every row had ended

    @property
    def truncated(self) -> list[bool]:
        """Rows cut at max_completion_length (none when the caller stopped the decode)."""
        return [not eos and not self.stopped for eos in self.ended_by_eos]

    @property
    def num_tokens(self) -> int:
        """Generated tokens over all rows."""
        return sum(len(ids) for ids in self.token_ids)


def row_seed(key: Sequence[int]) -> int:
    """A row's generator seed: a stable hash of its key (the same on every machine and Python run,
    which Python's hash() is not), 63 bits."""
    text = ",".join(str(int(part)) for part in key)
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def group_keys(seed: int, step: int, prompt_indices: Sequence[int], num_generations: int) -> list[tuple[int, ...]]:
    """The keys of a step's rows: each prompt's group of `num_generations`, prompt by prompt."""
    return [(seed, step, int(p), g) for p in prompt_indices for g in range(num_generations)]


def row_uniforms(keys: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """[rows, length] float64 uniforms in [0, 1): row i's t-th draw is token t's. Drawn on CPU generators
    so that a key gives the same draws on every device."""
    draws = []
    for key in keys:
        generator = torch.Generator().manual_seed(row_seed(key))
        draws.append(torch.rand(length, generator=generator, dtype=torch.float64))
    return torch.stack(draws)


def process_logits(
    scores: torch.Tensor,
    settings: SamplingSettings,
    new_tokens: int,
    eos_token_ids: torch.Tensor,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, vocab] next-token logits → the logits sampled from, as transformers' processors would:
    repetition penalty on `seen` tokens ([rows, vocab] bool), EOS masked while fewer than min_new_tokens
    were generated (`new_tokens` so far), temperature (0: greedy), top_k, top_p. Returns a new float32 tensor."""
    scores = scores.float().clone()
    if settings.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(scores < 0, scores * settings.repetition_penalty, scores / settings.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if new_tokens < settings.min_new_tokens:
        scores[:, eos_token_ids.to(scores.device)] = -torch.inf
    if settings.temperature == 0:  # greedy: all the mass on the likeliest token (top_k, top_p change nothing)
        return torch.full_like(scores, -torch.inf).scatter_(1, scores.argmax(dim=-1, keepdim=True), 0.0)
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if settings.top_k:
        k = min(settings.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)  # ties with the k-th are kept, as transformers
    if settings.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - settings.top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    return scores


def sample_tokens(scores: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(scores) by inverse CDF at the row's uniform (a token of probability
    0 is never chosen); returns the tokens and their log-probabilities."""
    logp = torch.log_softmax(scores, dim=-1)
    probs = logp.exp()
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # A uniform that rounds up to the total mass would fall past the last token: take the likeliest.
    past_end = tokens >= scores.shape[-1]
    tokens = torch.where(past_end, probs.argmax(dim=-1), tokens.clamp(max=scores.shape[-1] - 1))
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside `model`: under a wrapper that keeps it as `.module` (DDP, a DeepSpeed
    engine) and a PEFT model's adapters. Its config and forward signature are read; the forward itself is
    always the wrapper's, so that the wrapper's hooks run."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_names(base: nn.Module) -> tuple[str, bool]:
    """The cache keyword of a transformers model (`cache` from transformers 5.x, before it
    `past_key_values`), and whether it takes logits_to_keep (the lm_head at the last position only)."""
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def shared_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(the first row of each distinct prompt, each row's index among those): rows of equal prompts share one prefill."""
    index: dict[tuple[int, ...], int] = {}
    firsts, inverse = [], []
    for row, prompt in enumerate(prompts):
        key = tuple(prompt)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(row)
        inverse.append(index[key])
    return firsts, inverse


def _left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    # Each row's positions count its own tokens from 0; a pad's position is never attended to.
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def all_ranks_done(strategy) -> Callable[[bool], bool]:
    """generate()'s `all_done` where a forward is a collective: every rank says whether its rows are done,
    and the decode goes on while any rank's are not (one all-reduce per token)."""

    def all_done(mine: bool) -> bool:
        flag = torch.tensor(0.0 if mine else 1.0, device=strategy.env.device)
        return float(strategy.all_reduce_sum(flag)) == 0.0

    return all_done


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[Sequence[int]],
    settings: SamplingSettings,
    pad_token_id: int,
    eos_token_id: int | Sequence[int],
    return_logprobs: bool = False,
    all_done: Callable[[bool], bool] | None = None,
    inference: bool = False,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
) -> Completions:
    """Sample one completion per prompt row, row i from its own generator seeded by keys[i]: a row's
    completion is the same in any batch. A row stops at EOS (kept) or at max_completion_length; the loop
    stops when every row has. Runs in eval mode under no_grad with the KV cache on, whatever the model's
    config.use_cache says, and puts the model back in the mode it was in.

    `all_done(mine)`, where given, says whether every rank's rows are done: a model whose forward is a
    collective (FSDP2, ZeRO-3 gather parameters in it) must run as many forwards on every rank, so a rank
    whose rows are done keeps feeding pads until all are.

    `inference` runs it under torch.inference_mode (less autograd bookkeeping per op: -10-20% on the CPU
    bench), for a model whose forward allocates nothing that training uses later (not one that gathers
    its parameters inside the forward).

    `on_token(tokens)`, where given, sees each step's tokens as soon as they are sampled ([rows] on CPU;
    a row that had already ended gets pad_token_id), for a caller that prints them as they come. It
    returning True stops the decode there: the tokens so far come back, with `stopped` set. An exception
    it raises (KeyboardInterrupt from a terminal's Ctrl-C included) ends generate with that exception,
    the model back in its mode and nothing returned; a caller that wants the partial text keeps what
    on_token saw. Unused, the results are the same as without it. Its stop is one process's (with
    all_done, every rank's on_token must agree)."""
    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys: one key per row")
    if not prompts:
        return Completions([], [], [] if return_logprobs else None)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: every row needs at least one token to condition on")
    from transformers import DynamicCache

    device = next(model.parameters()).device
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    rows, length = len(prompts), settings.max_completion_length
    uniforms = row_uniforms(keys, length).to(device)
    input_ids, mask, positions = _left_padded(prompts, pad_token_id, device)
    base = transformers_model(model)
    cache_keyword, keeps_logits = _forward_names(base)
    extra = {"logits_to_keep": 1} if keeps_logits else {}

    was_training = model.training
    model.eval()
    tokens_by_step, logps_by_step = [], []
    stopped = False
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    try:
        # No row padded (prompts of one length): no mask at all, so the model builds none at each step.
        padded = not bool(mask.all())
        with torch.inference_mode() if inference else torch.no_grad():
            cache = DynamicCache(config=base.config)
            # A prompt shared by several rows (a GRPO group) is prefilled once; its cache and logits are
            # then copied to each of its rows.
            first_rows, inverse = shared_prompts(prompts)
            shared = len(first_rows) < rows
            pick = torch.tensor(first_rows, device=device) if shared else slice(None)
            out = model(input_ids=input_ids[pick], attention_mask=mask[pick] if padded else None, position_ids=positions[pick],
                        use_cache=True, **{cache_keyword: cache}, **extra)
            logits_rows = None
            if shared:
                logits_rows = torch.tensor(inverse, device=device)
                cache.reorder_cache(logits_rows)
            next_position = positions[:, -1:] + 1
            seen = None
            for step in range(length):
                heartbeat.beat()
                logits = out.logits[:, -1, :]
                if logits_rows is not None:  # the prefill's: one row per distinct prompt
                    logits, logits_rows = logits[logits_rows], None
                if settings.repetition_penalty != 1.0 and seen is None:
                    seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
                    seen.scatter_(1, input_ids, mask.bool())  # the prompt's own tokens, not its padding
                scores = process_logits(logits, settings, step, eos_ids, seen)
                token, logp = sample_tokens(scores, uniforms[:, step])
                token = torch.where(done, pad_token_id, token)  # finished rows feed pads, never read
                tokens_by_step.append(token)
                logps_by_step.append(logp)
                done = done | torch.isin(token, eos_ids)
                finished = bool(done.all())
                if on_token is not None and on_token(token.cpu()) is True and not finished:
                    stopped = finished = True
                if all_done is not None:
                    finished = all_done(finished)
                if step + 1 == length or finished:
                    break
                if seen is not None:
                    seen.scatter_(1, token[:, None], True)
                if padded:
                    mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                out = model(input_ids=token[:, None], attention_mask=mask if padded else None, position_ids=next_position,
                            use_cache=True, **{cache_keyword: cache}, **extra)
                next_position = next_position + 1
    finally:
        model.train(was_training)
    return _completions(tokens_by_step, logps_by_step, eos_ids, return_logprobs, stopped)


def _completions(
    tokens_by_step, logps_by_step, eos_ids: torch.Tensor, return_logprobs: bool, stopped: bool = False
) -> Completions:
    """Each row's tokens up to and including its first EOS."""
    tokens = torch.stack(tokens_by_step, dim=1).cpu()
    logps = torch.stack(logps_by_step, dim=1).float().cpu()
    is_eos = torch.isin(tokens, eos_ids.cpu())
    ended = is_eos.any(dim=1)
    lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, tokens.shape[1]).tolist()
    token_ids = [tokens[row, :n].tolist() for row, n in enumerate(lengths)]
    logprobs = [logps[row, :n].clone() for row, n in enumerate(lengths)] if return_logprobs else None
    return Completions(token_ids, ended.tolist(), logprobs, stopped)
