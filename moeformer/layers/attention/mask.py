"""Which keys each query may see: one `AttentionMask` per forward, rendered as boolean masks (whole or by blocks of
queries) or a flex `mask_mod`, all from the same rule so every backend agrees."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttentionMask:
    """Visibility rule shared by all layers of one forward (build a new one per forward).

    Query t sits at key index i = q_offset + t and may attend key j iff j <= i, i - j < window (if any),
    key_padding[b, j] and document_ids[b, j] == document_ids[b, i]; it may always attend itself (j == i), so no row
    is empty (queries at padded positions give finite garbage).
    """

    q_offset: int = 0  # index of the first query within the key sequence (cache length before this forward)
    key_padding: torch.Tensor | None = None  # (B, Tk) bool, True = real token, covering cached + new keys
    document_ids: torch.Tensor | None = None  # (B, Tk) int, packed documents: attend only within the same id
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def has_key_constraints(self) -> bool:
        """True when padding or documents restrict keys beyond causality and the window."""
        return self.key_padding is not None or self.document_ids is not None

    def check(self, batch: int, q_len: int, k_len: int) -> None:
        """Raise ValueError unless this mask fits `q_len` queries over `k_len` keys for `batch` rows."""
        if self.q_offset < 0 or self.q_offset + q_len > k_len:
            raise ValueError(f"queries occupy key positions [{self.q_offset}, {self.q_offset + q_len}) but only "
                             f"{k_len} keys were given (q_offset={self.q_offset}, q_len={q_len})")
        for name in ("key_padding", "document_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (batch, k_len):
                raise ValueError(f"{name} must have shape (batch, k_len) = {(batch, k_len)}, got {tuple(t.shape)}")
        if self.key_padding is not None and self.key_padding.dtype != torch.bool:
            raise TypeError(f"key_padding must be a bool tensor (True = real token), got {self.key_padding.dtype}")

    def dense(self, q_len: int, k_len: int, window: int | None, device: torch.device) -> torch.Tensor:
        """Boolean mask (B or 1, 1, q_len, k_len), True = may attend; memoised so layers share one copy."""
        key = ("dense", q_len, k_len, window, torch.device(device))
        return self.memoised(key, lambda: self.block(range(q_len), range(k_len), window, device))

    def block(self, queries: range, keys: range, window: int | None, device: torch.device) -> torch.Tensor:
        """Boolean mask (B or 1, 1, len(queries), len(keys)) of query indices `queries` (0 = first query) against key
        indices `keys`, True = may attend; not memoised, so callers bound memory by asking for blocks."""
        rows = self.key_padding if self.key_padding is not None else self.document_ids
        b = torch.arange(1 if rows is None else rows.shape[0], device=device)[:, None, None]
        q_idx = torch.arange(queries.start, queries.stop, device=device)[None, :, None]
        k_idx = torch.arange(keys.start, keys.stop, device=device)[None, None, :]
        rule = self.memoised(("rule", window, torch.device(device)), lambda: self.mask_mod(window, device))
        return rule(b, None, q_idx, k_idx)[:, None]

    def memoised(self, key: Hashable, build: Callable[[], T]) -> T:
        """Build a derived mask once per AttentionMask (all layers of a forward share it)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def mask_mod(self, window: int | None, device: torch.device) -> MaskMod:
        """The rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx) (also broadcast over index grids)."""
        padding, docs = self.key_padding, self.document_ids
        offset = torch.tensor(self.q_offset, device=device)  # a tensor, so compiled kernels don't specialise on it

        def allowed(b: torch.Tensor, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            i = q_idx + offset
            ok = kv_idx <= i
            if window is not None:
                ok = ok & (i - kv_idx < window)
            if padding is not None:
                ok = ok & padding[b, kv_idx]
            if docs is not None:
                ok = ok & (docs[b, kv_idx] == docs[b, i])
            return ok | (kv_idx == i)

        return allowed
