"""Autoregressive sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V); temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return `input_ids` followed by up to `max_new_tokens` sampled tokens (B, T + n).

    Prompts of different lengths are left-padded with `attention_mask` (1 = real token). A row that emitted `eos`
    is filled with `eos` afterwards; generation stops early once every row has finished.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch, prompt_len = input_ids.shape
    cache = model.new_cache(batch, prompt_len + max_new_tokens)
    mask = attention_mask.bool() if attention_mask is not None else None
    logits = model(input_ids, attention_mask=mask, cache=cache).logits[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos is not None:
            token = token.masked_fill(finished, eos)
            finished |= token == eos
        new_tokens.append(token)
        if eos is not None and bool(finished.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        logits = model(token[:, None], attention_mask=mask, cache=cache).logits[:, -1]
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
