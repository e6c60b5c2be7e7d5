"""The paged KV cache: every layer's keys and values (or MLA latents) in one pool of fixed-size blocks, a block table
per request, a free list, and the prefix cache (full blocks keyed by the hash of their token chain, shared by
reference count, unreferenced ones evicted least recently used first).

A forward over the pool sees, per request row, its tokens gathered right-aligned into a contiguous (B, ..., L, ...)
view: row b's n_b tokens sit at view slots [L - n_b, L) and the forward's T new tokens are the last T slots of every
row, so one `AttentionMask` (queries at the device offset L - T, left padding hidden by `key_padding`) serves the
whole batch through the model's ordinary attention path; the shapes depend on (B, T, L) only, never on the lengths,
which live in device tensors (a compiled, CUDA-graph captured decode step replays at any lengths). A decode step
(T = 1) instead hands attention the pools with the block tables (`moeformer.layers.attention.paged`): its kernel
reads each row's own blocks in place, the view being the reference's."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

import torch

from moeformer.layers.attention import Attention, AttentionMask
from moeformer.layers.attention.paged import Pages
from moeformer.layers.mla import MLAttention

NULL_BLOCK = 0  # never handed out: padded batch rows write their garbage there


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: a digest of its parent block's key and its own tokens, so equal keys
    mean equal token chains from the start of the sequence."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockPool:
    """Block bookkeeping on the host: reference counts, the free list and, with `prefix_caching`, the table of
    cached full blocks. Blocks are only numbers here; the tensors live in the layer pools."""

    def __init__(self, num_blocks: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.prefix_caching = num_blocks, prefix_caching
        self.refs = [0] * num_blocks
        self.key = [None] * num_blocks  # prefix-cache key of each registered block
        self.free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self.cached: dict[bytes, int] = {}  # key -> block, every registered block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks no request holds, oldest first
        self.hit_blocks = 0  # prefix-cache hits so far, in blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no request holds."""
        return len(self.free) + len(self.evictable)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1  # less the null block

    def allocate(self) -> int:
        """A block for one request (reference count 1): a free one, else the least recently used cached one, which
        leaves the prefix cache."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key[block]]
            self.key[block] = None
        else:
            raise RuntimeError("paged KV cache out of blocks (the scheduler checks before allocating)")
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block no request holds becomes free, or evictable if it is cached."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.key[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (without taking them)."""
        blocks = []
        if self.prefix_caching:
            for key in keys:
                block = self.cached.get(key)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        """Hold matched cached blocks (a prefix-cache hit)."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        self.hit_blocks += len(blocks)

    def register(self, block: int, key: bytes) -> None:
        """Record that `block` holds the full block `key` (a block whose key is already cached stays private)."""
        if self.prefix_caching and key not in self.cached and self.key[block] is None:
            self.cached[key] = block
            self.key[block] = key


class PagedKV:
    """One softmax-attention layer's keys and values, (num_blocks * block_size, n_kv_heads, head_dim) each, seen by
    the layer during a forward as a `KVCache` whose `update` writes the new tokens and returns the gathered view, or
    in a decode step the pools themselves (attention reads them through the mask's `pages`)."""

    def __init__(self, slots: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.zeros(slots, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.batch: PagedBatch | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, at=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at the batch's write slots; return the gathered (B, Hkv, L, D) keys and values,
        or the pools in a decode step (`at`, the mask's offset, is implied by the batch)."""
        batch = self.batch
        for pool, new in ((self.k, k), (self.v, v)):
            pool.index_copy_(0, batch.write_slots, new.transpose(1, 2).reshape(-1, *pool.shape[1:]))
        if batch.pages is not None:
            return self.k, self.v
        return batch.view.gather(self.k), batch.view.gather(self.v)

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.k[0].numel() * self.k.element_size()


class PagedLatent:
    """One MLA layer's cache, (num_blocks * block_size, kv_lora_rank + rope_dim): per token the normalised latent
    then the rotated rope key, as MLA's `LatentCache` stores them. A decode step of a layer that absorbs one query
    (MLA's decode path: the latent rows are its single key and value head) gets the pool itself; otherwise, as for a
    prompt, the gathered rows, which the layer expands per head."""

    def __init__(self, slots: int, width: int, dtype: torch.dtype, device: torch.device, in_place: bool) -> None:
        self.kv = torch.zeros(slots, width, dtype=dtype, device=device)
        self.in_place = in_place
        self.batch: PagedBatch | None = None

    def update(self, latent: torch.Tensor, k_rot: torch.Tensor, at=None) -> torch.Tensor:
        """Store (B, T, rank) latents and (B, T, rope) keys; return the gathered (B, L, rank + rope) rows, or the
        pool (slots, rank + rope) in a decode step."""
        batch = self.batch
        self.kv.index_copy_(0, batch.write_slots, torch.cat((latent, k_rot), dim=-1).reshape(-1, self.kv.shape[1]))
        if batch.pages is not None and self.in_place:
            return self.kv
        return batch.view.gather(self.kv[:, None])[:, 0]

    @property
    def bytes_per_slot(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()


def layer_pool(attn, slots: int, dtype: torch.dtype, device: torch.device) -> PagedKV | PagedLatent:
    """The pool for one layer's attention module; linear attention keeps a recurrent state, which has no pages."""
    if isinstance(attn, MLAttention):
        return PagedLatent(slots, attn.kv_lora_rank + attn.rope_dim, dtype, device, in_place=attn.absorbs(1))
    if isinstance(attn, Attention):
        return PagedKV(slots, attn.n_kv_heads, attn.head_dim, dtype, device)
    raise ValueError(
        f"the serving engine pages softmax and MLA attention caches; {type(attn).__name__} keeps a "
        "recurrent state per sequence, which has no pages (serve such models with model.generate)"
    )


class PagedBatch:
    """The cache argument of one forward over the pools (the protocol of `StaticCache`: `begin`, len, indexing).

    Inputs are device tensors of fixed shape: `block_tables` (B, max_blocks) (row b's blocks; unused entries and
    padded rows: the null block), `lengths` (B,) tokens row b holds after this forward (padded rows: `seq`) and,
    optionally, `new` (B,) how many of the forward's `seq` tokens are row b's (default all; a row with fewer has
    its real tokens last, after seq - new[b] filler tokens, which are written to the null block and hidden from
    every query: several prompt chunks of different lengths share one forward) and `rows` (B,) bool, the real rows.
    `view_len` L (a multiple of the block size, at least every length + filler) fixes the view's width. A decode
    step (seq 1) hands attention the pools and `Pages` through the mask (read in place by the paged kernel); with
    view_len None it builds no view at all (every layer must then read in place: the view of a long context costs
    B x max_model_len indices per step)."""

    def __init__(
        self,
        pools: list,
        block_size: int,
        block_tables: torch.Tensor,
        lengths: torch.Tensor,
        seq: int,
        view_len: int | None,
        new: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.pools, self.seq = pools, seq
        self.rows = batch = block_tables.shape[0]
        device = block_tables.device
        filler = None
        if view_len is None:
            if seq != 1 or new is not None:
                raise ValueError("a paged batch without a view runs one token per row")
            position = (lengths - 1)[:, None]
            self.valid, view_len = None, seq
            self.view = Pages(block_tables, lengths, block_size, None, 0)
        else:
            column = torch.arange(view_len, device=device)
            position = column - (view_len - lengths[:, None])  # token index of each view slot, (B, L)
            if new is not None:
                filler = (column >= view_len - seq) & (column < view_len - new[:, None])
                position = torch.where(column < view_len - seq, position + seq - new[:, None], position)
            self.valid = position >= 0 if filler is None else (position >= 0) & ~filler
            position = position.clamp(min=0)
        slots = block_tables.gather(1, position // block_size) * block_size + position % block_size
        if filler is not None:
            slots = slots.masked_fill(filler, NULL_BLOCK * block_size)
        if self.valid is not None:
            self.view = Pages(block_tables, lengths, block_size, slots.reshape(-1), view_len)
        self.pages = self.view if seq == 1 else None
        self.write_slots = slots[:, view_len - seq :].reshape(-1)
        self.positions = position[:, view_len - seq :]
        self.offset = torch.full((), view_len - seq, dtype=torch.long, device=device)
        real = None if filler is None else ~filler[:, view_len - seq :]
        if rows is not None:
            real = rows[:, None].expand(batch, seq) if real is None else real & rows[:, None]
        self.token_mask = real

    def __len__(self) -> int:
        return len(self.pools)

    def __getitem__(self, layer: int):
        pool = self.pools[layer]
        pool.batch = self
        return pool

    def begin(
        self, batch: int, seq: int, attention_mask: torch.Tensor | None
    ) -> tuple[AttentionMask, torch.Tensor, torch.Tensor | None]:
        """The forward's attention mask, rope positions and MoE token mask (fillers and padded rows route nothing)."""
        if (batch, seq) != (self.rows, self.seq) or attention_mask is not None:
            raise ValueError(
                f"a paged batch runs {self.rows} rows of {self.seq} tokens without an "
                f"attention_mask, got ({batch}, {seq})"
            )
        mask = AttentionMask(q_offset=self.offset, key_padding=self.valid, pages=self.pages)
        return mask, self.positions, self.token_mask
