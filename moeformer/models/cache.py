"""`StaticCache`: a whole model's decoding state at fixed shapes and addresses, with its position on the device, so
one compiled (and CUDA-graph captured) decode step serves every position without recompiling or syncing."""

from __future__ import annotations

import torch

from moeformer.layers.attention import AttentionMask


class StaticCache:
    """Every layer's preallocated cache (KV, MLA latent or linear-attention state) plus, on the device, the next slot
    to write (`position`), which slots hold real tokens (`valid`, (B, max_len) bool: written and not padding) and
    how many prompt slots of each row are padding (`pads`; a token's rope position is its slot minus that).

    The first forward after `reset` is the prompt: it fills slots [0, T) and attends over itself (host-side shapes,
    as without a cache). Every later forward writes at `position` and attends over the whole buffer under `valid`;
    no host value changes between them, so their compiled graph is reused at every position. Writes past `max_len`
    are not checked per step (that would sync): `generate` sizes the cache.
    """

    def __init__(self, layers: list, batch: int, max_len: int, device: torch.device) -> None:
        self.layers, self.batch, self.max_len = layers, batch, max_len
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pads = torch.zeros(batch, dtype=torch.long, device=device)
        self.prefilled = False

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def reset(self) -> None:
        """Empty the cache for a new prompt (buffers are reused in place)."""
        self.position.zero_()
        self.valid.zero_()
        self.pads.zero_()
        for cache in self.layers:
            cache.reset()
        self.prefilled = False

    def begin(
        self, batch: int, seq: int, attention_mask: torch.Tensor | None
    ) -> tuple[AttentionMask, torch.Tensor | None, torch.Tensor | None]:
        """Record a forward of `seq` new tokens; return its attention mask, rope positions (None: the usual ones of a
        prompt) and MoE token mask. `attention_mask` (B, seq) is the prompt's padding: only the prompt may have it."""
        if batch != self.batch:
            raise ValueError(f"static cache holds {self.batch} rows, got a batch of {batch}")
        if not self.prefilled:
            if seq > self.max_len:
                raise ValueError(f"prompt of {seq} tokens does not fit the static cache of {self.max_len}")
            real = attention_mask if attention_mask is not None else self.valid.new_ones(batch, seq)
            self.valid[:, :seq] = real
            self.pads.copy_(seq - real.sum(1))
            self.position.fill_(seq)
            self.prefilled = True
            return AttentionMask(key_padding=attention_mask), None, attention_mask
        if attention_mask is not None:
            raise ValueError("a static cache keeps the prompt's padding: pass attention_mask with the prompt only")
        offset = self.position.clone()
        slots = offset + torch.arange(seq, device=offset.device)
        self.valid.index_fill_(1, slots, True)
        self.position += seq
        return AttentionMask(q_offset=offset, key_padding=self.valid), slots[None] - self.pads[:, None], None
