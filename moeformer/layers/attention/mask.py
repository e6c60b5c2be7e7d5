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

    q_offset is a host int when the keys are the cached prefix plus the new tokens (k_len = q_offset + q_len), or a
    0-d device tensor when the keys are a whole preallocated buffer (static-cache decoding): then nothing here reads
    it on the host, so one compiled step serves every position without a sync, and `key_padding` (the buffer's
    validity) hides the slots not written yet. With `pages` the keys come as paged pools (serving); the rule is that
    of their gathered view (see `moeformer.layers.attention.paged`).
    """

    q_offset: int | torch.Tensor = 0  # key index of the first query (cache length before this forward)
    key_padding: torch.Tensor | None = None  # (B, Tk) bool, True = real token, covering cached + new keys
    document_ids: torch.Tensor | None = None  # (B, Tk) int, packed documents: attend only within the same id
    pages: Any = None  # `paged.Pages` when the keys are read from paged pools (the rule above is of their view)
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def in_buffer(self) -> bool:
        """True when the keys are a whole static buffer and q_offset a device tensor (see the class docstring)."""
        return isinstance(self.q_offset, torch.Tensor)

    @property
    def has_key_constraints(self) -> bool:
        """True when padding or documents restrict keys beyond causality and the window."""
        return self.key_padding is not None or self.document_ids is not None

    def check(self, batch: int, q_len: int, k_len: int) -> None:
        """Raise ValueError unless this mask fits `q_len` queries over `k_len` keys for `batch` rows (a device
        q_offset is not read: its range is the static cache's owner's to keep)."""
        if not self.in_buffer and (self.q_offset < 0 or self.q_offset + q_len > k_len):
            raise ValueError(
                f"queries occupy key positions [{self.q_offset}, {self.q_offset + q_len}) but only "
                f"{k_len} keys were given (q_offset={self.q_offset}, q_len={q_len})"
            )
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

    def block_mask(self, q_len: int, k_len: int, window: int | None, device: torch.device, block: int = 128) -> Any:
        """FlexAttention BlockMask of the rule, built from per-block summaries (index ranges, min/max document id,
        any/all real keys) in O((n / block)^2) memory: no query x key grid is ever formed. A block pair is skipped
        only when the summaries prove it empty and is full only when they prove every pair allowed; all others are
        partial, where the mask_mod decides per element."""
        from torch.nn.attention.flex_attention import BlockMask

        rows = self.key_padding if self.key_padding is not None else self.document_ids
        batch = 1 if rows is None else rows.shape[0]
        q_first = torch.arange(0, q_len, block, device=device) + self.q_offset  # key index of each block's 1st query
        q_last = (q_first + block - 1).clamp(max=self.q_offset + q_len - 1)
        k_first = torch.arange(0, k_len, block, device=device)
        k_last = (k_first + block - 1).clamp(max=k_len - 1)
        qf, ql, kf, kl = q_first[:, None], q_last[:, None], k_first[None], k_last[None]
        diagonal = (kf <= ql) & (kl >= qf)  # holds some query's own key: never empty
        some = (kf <= ql).expand(batch, -1, -1)
        every = (kl <= qf) & (ql - qf == block - 1) & (kl - kf == block - 1)  # whole blocks only
        if window is not None:
            some = some & (qf - kl < window)
            every = every & (ql - kf < window)
        every = every.expand(batch, -1, -1)
        if self.key_padding is not None:
            real_any, real_all = (_per_block(self.key_padding, block, op) for op in (torch.amax, torch.amin))
            some, every = some & real_any[:, None].bool(), every & real_all[:, None].bool()
        if self.document_ids is not None:
            docs = self.document_ids
            q_docs = self.at_queries(docs, q_len)
            (k_min, k_max), (q_min, q_max) = (
                (_per_block(d, block, torch.amin), _per_block(d, block, torch.amax)) for d in (docs, q_docs)
            )
            some = some & (k_min[:, None] <= q_max[:, :, None]) & (k_max[:, None] >= q_min[:, :, None])
            one_doc = (q_min == q_max)[:, :, None] & (k_min == k_max)[:, None] & (q_min[:, :, None] == k_min[:, None])
            every = every & one_doc
        some = some | diagonal
        partial, full = some & ~every, some & every

        def layout(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # listed blocks first
            return blocks.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

        return BlockMask.from_kv_blocks(
            *layout(partial),
            *layout(full),
            BLOCK_SIZE=block,
            mask_mod=self.mask_mod(window, device),
            seq_lengths=(q_len, k_len),
        )

    def at_queries(self, t: torch.Tensor, q_len: int) -> torch.Tensor:
        """The columns of a (B, Tk) per-key tensor (key_padding, document_ids) at the `q_len` query positions."""
        if self.in_buffer:
            return t.index_select(1, self.q_offset + torch.arange(q_len, device=t.device))
        return t[:, self.q_offset : self.q_offset + q_len]

    def memoised(self, key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        """Build a derived mask once per AttentionMask (all layers of an eager forward share it). While compiling it
        is built at each use: a traced key may hold symbolic sizes, which torch.compile can neither hash nor compare."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def mask_mod(self, window: int | None, device: torch.device) -> MaskMod:
        """The rule as a FlexAttention mask_mod(b, h, q_idx, kv_idx) (also broadcast over index grids)."""
        padding, docs = self.key_padding, self.document_ids
        offset = torch.as_tensor(self.q_offset, device=device)  # a tensor, so compiled kernels don't specialise on it

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


def _per_block(x: torch.Tensor, block: int, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """reduce(x) over consecutive blocks of columns, x (B, L) -> (B, ceil(L / block)); the last block is padded with
    copies of x's last column, which changes neither a min nor a max."""
    pad = -x.shape[1] % block
    if pad:
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
    return reduce(x.view(x.shape[0], -1, block).to(torch.int64), dim=-1)
