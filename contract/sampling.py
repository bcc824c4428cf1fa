"""Next-token sampling for a batch whose rows each have their own parameters, with Dolly's
semantics per row: temperature, then top-k (0 = off), then nucleus top-p, as transformers'
warpers apply them; temperature 0 is greedy. OpenAI's frequency and presence penalties, where a
request sets them, lower the logits of the tokens the row has generated before any of these, and
a row's stop tokens are held back until it has `min_tokens` (vLLM's extension).

Nucleus sampling is done by rejection instead of sorting the vocabulary. Sorting 50k logits per
row per token costs more than the forward pass of a small model on a CPU; a draw from the full
distribution, accepted when the probability mass strictly above it is below top_p (exactly the
tokens transformers' TopPLogitsWarper keeps), needs about 1/top_p draws and no sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.generation import MAX_NEW_TOKENS, MIN_TOKENS, TEMPERATURE, TOP_K, TOP_P

# Rows still rejected after this many draws (possible only with a tiny top_p) fall back to a sort.
_MAX_DRAWS = 8


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    top_k: int = TOP_K
    max_tokens: int = MAX_NEW_TOKENS
    min_tokens: int = MIN_TOKENS  # stop tokens cannot end the answer before it has this many tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the times a token was generated already
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has been generated


def penalize(logits: torch.Tensor, counts: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's penalties over each row's generated tokens (`counts` [rows, vocab]), as vLLM applies
    them. The prompt is not counted: copying from the context is what closed QA, extraction and
    summarization ask for; a small model's greedy loops are what the penalties are for."""
    if not any(p.frequency_penalty or p.presence_penalty for p in params):
        return logits
    frequency = torch.tensor([p.frequency_penalty for p in params], device=logits.device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=logits.device)[:, None]
    return logits.float() - frequency * counts - presence * (counts > 0)


def hold_back_stops(
    logits: torch.Tensor, generated: torch.Tensor, params: list[SamplingParams], stop_ids: frozenset[int]
) -> torch.Tensor:
    """vLLM's min_tokens: the stop tokens of each row that has generated (`generated` [rows]) fewer
    than its min_tokens cannot be drawn."""
    if not stop_ids or not any(p.min_tokens for p in params):
        return logits
    early = generated < torch.tensor([p.min_tokens for p in params], device=logits.device)
    if not early.any():
        return logits
    stops = torch.tensor(sorted(stop_ids), device=logits.device)
    held = logits.float().clone()
    held[:, stops] = torch.where(early[:, None], -torch.inf, held[:, stops])
    return held


def generators_for(params: list[SamplingParams], device: torch.device) -> list[torch.Generator | None]:
    """One generator per seeded row, so a seeded request repeats whatever it is batched with."""
    return [torch.Generator(device).manual_seed(p.seed) if p.seed is not None else None for p in params]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row of `logits` [rows, vocab]."""
    logits = logits.float()
    greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    if greedy.all():
        return logits.argmax(-1)
    # Greedy rows are sampled along with the others (at temperature 1) and then overwritten:
    # cheaper than copying the sampled rows out of the batch.
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    probs = _top_k(logits / temperature[:, None], [p.top_k for p in params]).softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    tokens = _nucleus(probs, top_p, generators)
    return torch.where(greedy, logits.argmax(-1), tokens) if greedy.any() else tokens


def _top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    ks = [min(k, scores.shape[-1]) for k in ks]
    if not any(ks):
        return scores
    kth = scores.topk(max(ks), dim=-1).values
    k = torch.tensor(ks, device=scores.device)[:, None]
    threshold = torch.where(k > 0, kth.gather(-1, k.clamp(min=1) - 1), -torch.inf)
    return scores.masked_fill(scores < threshold, -torch.inf)


def _uniform(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    u = torch.rand(len(generators), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand((), generator=g, device=device)
    return u


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    # Inverse-CDF draws: one uniform per row and a binary search, where torch.multinomial would
    # draw one exponential per vocabulary entry.
    cdf = probs.cumsum(-1)
    last = probs.shape[-1] - 1
    chosen = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    for _ in range(_MAX_DRAWS):
        u = _uniform([generators[i] for i in pending.tolist()], probs.device)
        everyone = pending.numel() == probs.shape[0]  # no copies on the first, usual, draw
        rows, p = (cdf, probs) if everyone else (cdf[pending], probs[pending])
        draw = torch.searchsorted(rows, (u * rows[:, -1])[:, None]).clamp(max=last)
        mass_above = torch.where(p > p.gather(-1, draw), p, 0).sum(-1)
        accepted = mass_above < top_p[pending]
        chosen[pending[accepted]] = draw[accepted, 0]
        pending = pending[~accepted]
        if pending.numel() == 0:
            return chosen
    rows = probs[pending]
    sorted_probs, order = rows.sort(-1, descending=True)
    outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[pending][:, None]
    kept = sorted_probs.masked_fill(outside, 0)
    kept_cdf = kept.cumsum(-1)
    u = _uniform([generators[i] for i in pending.tolist()], probs.device)
    index = torch.searchsorted(kept_cdf, (u * kept_cdf[:, -1])[:, None]).clamp(max=last)
    chosen[pending] = order.gather(-1, index)[:, 0]
    return chosen
