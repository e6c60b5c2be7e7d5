"""Transformers' router load-balancing loss, computed over all MoE layers at once from our `MoEStats`: what the
Hugging Face parity tests compare with transformers' `aux_loss`."""

from __future__ import annotations

import torch


def hf_load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = top-k selections of expert e per token and P_e = mean router probability,
    both pooled over every layer's (N, E) logits (the value transformers reports as `aux_loss`, unweighted).
    token_mask (N,) bool drops padding tokens."""
    if not router_logits:
        raise ValueError("hf_load_balancing_loss needs the router logits of at least one MoE layer")
    num_experts = router_logits[0].shape[-1]
    counts = router_logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum = torch.zeros_like(counts)
    rows = counts.new_zeros(())
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        weight = probs.new_ones(probs.shape[0]) if token_mask is None else token_mask.reshape(-1).float()
        chosen = probs.topk(top_k, dim=-1).indices
        counts = counts.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(dim=0)
        rows = rows + weight.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()
