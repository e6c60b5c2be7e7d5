"""Packed sequences for linear attention: document ids / cu_seqlens -> per-row segment ids, and fla's varlen form.

A segment is a maximal run of equal document ids within a row; the recurrent state resets where a new segment starts.
"""

from __future__ import annotations

import torch


def segment_ids(
    document_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int
) -> torch.Tensor | None:
    """(B, T) long segment index per token (0, 1, ... along each row), or None when each row is one document.

    `document_ids` is (B, T) ints; `cu_seqlens` holds flash-attn style (N + 1,) offsets of one packed row (B == 1).
    """
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError("pass either document_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs a single packed row (batch 1), got batch {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.long()
        if cu[0].item() != 0 or cu[-1].item() != seq_len or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing from 0 to the sequence length {seq_len}, got {cu.tolist()}"
            )
        positions = torch.arange(seq_len, device=cu.device)
        return torch.searchsorted(cu[1:], positions, right=True).unsqueeze(0)
    if document_ids is not None:
        if tuple(document_ids.shape) != (batch, seq_len):
            raise ValueError(f"document_ids must have shape {(batch, seq_len)}, got {tuple(document_ids.shape)}")
        starts = document_ids[:, 1:] != document_ids[:, :-1]
        return torch.cat([starts.new_zeros(batch, 1), starts], dim=1).long().cumsum(1)
    return None


def varlen_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten (B, T) segments to one row: (cu_seqlens (N + 1,), first segment of each row (B,), last segment (B,))."""
    batch, seq_len = segments.shape
    per_row = segments[:, -1] + 1
    first = torch.cumsum(per_row, 0) - per_row
    flat = (segments + first[:, None]).reshape(-1)
    new_start = torch.ones_like(flat, dtype=torch.bool)
    new_start[1:] = flat[1:] != flat[:-1]
    ends = torch.tensor([batch * seq_len], device=flat.device)
    cu_seqlens = torch.cat([new_start.nonzero().squeeze(1), ends])
    return cu_seqlens, first, first + per_row - 1
