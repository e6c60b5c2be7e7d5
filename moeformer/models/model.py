"""`CausalLM`: token embeddings -> transformer blocks (attention + dense MLP or MoE) -> norm -> LM head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moeformer.layers.attention import Attention, AttentionMask
from moeformer.layers.linear_attention import CausalLinearAttention
from moeformer.layers.lm_head import IGNORE_INDEX, LMHead
from moeformer.layers.mla import MLAttention, mla_softmax_scale
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import MoE, MoEStats, update_router_biases
from moeformer.layers.norms import build_norm
from moeformer.layers.quant import QuantizedWeight
from moeformer.layers.rope import RotaryEmbedding
from moeformer.models import checkpoint, generation
from moeformer.models.cache import StaticCache
from moeformer.models.config import LINEAR_ATTENTION, MLA_ATTENTION, SOFTMAX_ATTENTION, ModelConfig
from moeformer.models.quantize import build_quantized

OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "w_out")  # initialised with std scaled by depth


@dataclass
class CausalLMOutput:
    """What a forward returns; `loss` already includes the weighted MoE aux losses."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)


def build_attention(config: ModelConfig, layer: int) -> nn.Module:
    """The attention module of layer `layer`, chosen by `config.attention_type(layer)`."""
    kind = config.attention_type(layer)
    if kind == SOFTMAX_ATTENTION:
        return Attention(
            config.dim,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            bias=config.attn_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.norm_eps,
            sliding_window=config.sliding_window,
            backend=config.attn_backend,
        )
    if kind == MLA_ATTENTION:
        return MLAttention(
            config.dim,
            config.n_heads,
            config.mla,
            norm_eps=config.norm_eps,
            backend=config.attn_backend,
            softmax_scale=mla_softmax_scale(config.mla, config.rope_scaling),
        )
    if kind in LINEAR_ATTENTION:
        return CausalLinearAttention(
            config.dim,
            config.n_heads,
            config.head_dim,
            kind=kind,
            norm_eps=config.norm_eps,
            **config.linear_attention,
        )
    raise ValueError(f"layer {layer}: unknown attention type {kind!r}")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the MLP may be a MoE."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm, config.dim, config.norm_eps)
        self.attn = build_attention(config, layer)
        self.mlp_norm = build_norm(config.norm, config.dim, config.norm_eps)
        if config.is_moe_layer(layer):
            self.mlp = MoE(config.dim, config.moe)
        else:
            self.mlp = MLP(config.dim, config.ffn_dim, config.activation, bias=config.mlp_bias)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache=None,
        token_mask: torch.Tensor | None = None,
        stats: bool = True,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """One block; `stats=False` (inference) skips the MoE losses and load statistics and returns None for them."""
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        h = self.mlp_norm(x)
        if self.is_moe:
            out, moe_stats = self.mlp(h, token_mask=token_mask, stats=stats)
            return x + out, moe_stats
        return x + self.mlp(h), None


class CausalLM(nn.Module):
    """Decoder-only language model built from a `ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = build_norm(config.norm, config.dim, config.norm_eps)
        self.lm_head = LMHead(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(
            config.rotary_dim, theta=config.rope_theta, max_seq_len=config.max_seq_len, scaling=config.rope_scaling
        )
        if config.quantization:  # the empty quantized structure that the record describes
            build_quantized(self)

    # ---- initialisation ------------------------------------------------------------------
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices, ones for norms, zeros for biases; output projections scaled by depth.
        Quantized weights get the quantized codes of such a draw."""
        depth_scale = (2 * self.config.n_layers) ** -0.5

        def std(name: str) -> float:
            return self.config.init_std * (depth_scale if name.endswith(OUTPUT_PROJECTIONS) else 1.0)

        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=std(name))
            for name, module in self.named_modules():
                if isinstance(module, QuantizedWeight):
                    module.quantize_(torch.empty(module.shape, device=module.codes.device).normal_(0.0, std(name)))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute buffers that are not saved in checkpoints (rope tables, router load counters)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: list | StaticCache | None = None,
        return_logits: bool = True,
        targets: torch.Tensor | None = None,
        stats: bool = True,
        logits_to_keep: int = 0,
        layers: Sequence[nn.Module] | None = None,
    ) -> CausalLMOutput:
        """Logits and next-token loss. Either `labels`, aligned with `input_ids` (Hugging Face style: position t
        predicts labels[t + 1], targets crossing `document_ids` boundaries are dropped), or `targets`, already
        shifted (position t predicts targets[t]); -100 is ignored. `attention_mask` (B, T_cache + T), 1 = real
        token, supports left padding (with a `StaticCache`: (B, T) with the prompt only). `stats=False` skips the MoE
        aux losses and statistics (inference); `logits_to_keep=n` computes the logits of the last n positions only
        (0: all); the loss never needs them: the LM head computes it from the hidden states, chunk by chunk.
        `layers` runs other modules as the blocks, one per layer (the generation `Decoder` passes compiled
        wrappers of them).

        Checked here: the shapes, the sequence length against `config.max_seq_len` (not under dynamic-NTK rope,
        whose point is to run past it; nor over a `StaticCache`, whose slots include padding and whose owner,
        `generate`, checks the positions), and token ids against the vocabulary when they are on the CPU outside
        torch.compile: on CUDA that check would be a host sync per training step and per compiled decode step, so
        there an out-of-range id is left to the device-side assert of the embedding (`generate` checks its prompt
        once per call)."""
        if labels is not None and targets is not None:
            raise ValueError("pass either labels (unshifted) or targets (shifted), not both")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            generation.check_token_ids(input_ids, self.config.vocab_size)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        if hasattr(cache, "begin"):  # a cache that places the tokens itself: StaticCache, the serving PagedBatch
            if document_ids is not None:
                raise ValueError("a static cache decodes one sequence per row: document_ids do not apply")
            mask, static_positions, token_mask = cache.begin(B, T, attention_mask)
            past = 0  # the prompt's positions count its real tokens; later forwards take the cache's
            position_ids = static_positions if position_ids is None else position_ids
        else:
            past = _cache_length(cache)
            self.check_length(past + T)
            if attention_mask is not None and attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be (batch, cached + new) = {(B, past + T)}, got {tuple(attention_mask.shape)}"
                )
            mask = AttentionMask(q_offset=past, key_padding=attention_mask, document_ids=document_ids)
            token_mask = attention_mask[:, past:] if attention_mask is not None else None
        if position_ids is None:
            position_ids = _default_positions(B, T, past, attention_mask, input_ids.device)
        rope = self.rope(position_ids)

        x = self.tok_embeddings(input_ids)
        moe_stats: list[MoEStats] = []
        for i, block in enumerate(self.layers if layers is None else layers):
            x, s = block(x, rope, mask, cache[i] if cache is not None else None, token_mask, stats=stats)
            if s is not None:
                moe_stats.append(s)
        x = self.norm(x)

        aux = torch.stack([s.aux_loss for s in moe_stats]).sum() if moe_stats else None
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x) if return_logits else None
        ce = loss = None
        if labels is not None:
            targets = _shift_labels(labels, document_ids)
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
            ce = self.lm_head(x, targets, self.config.loss_chunk_size)  # every head: hidden states + targets -> loss
            loss = ce + aux if aux is not None else ce
        return CausalLMOutput(logits=logits, loss=loss, ce_loss=ce, aux_loss=aux, moe_stats=moe_stats)

    def check_length(self, length: int, what: str | None = None) -> None:
        """Sequences (cached + new) may not outgrow `max_seq_len`, except under dynamic-NTK rope scaling; `what`
        names the length in the error (default: the sequence, cached + new)."""
        if length > self.config.max_seq_len and self.rope.scaling_type != "dynamic":
            what = what or f"sequence of {length} tokens (cached + new)"
            raise ValueError(f"{what} exceeds the model's max_seq_len {self.config.max_seq_len}")

    # ---- incremental decoding ------------------------------------------------------------
    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, static: bool = False
    ) -> list | StaticCache:
        """Per-layer caches (KV buffers, MLA latents, or a recurrent state for linear attention) for `max_len`
        tokens: a list whose length is kept on the host (eager decoding), or with static=True a `StaticCache`, whose
        position lives on the device (compiled decoding)."""
        p = next(self.parameters())
        layers = [block.attn.init_cache(batch, max_len, dtype or p.dtype, p.device) for block in self.layers]
        return StaticCache(layers, batch, max_len, p.device) if static else layers

    def update_router_biases(self) -> None:
        """Apply aux-loss-free bias updates from the load observed since the last call (call after each step)."""
        update_router_biases(self)

    generate = generation.generate  # model.generate(input_ids, max_new_tokens, ...): eager or compiled, streamed

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the compiled decoders `generate(compile=True)` keeps (caches, CUDA graphs)."""
        state = super().__getstate__()
        state.pop("_decoders", None)
        return state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path, dtype: torch.dtype | None = None, device=None, quantize: str | None = None, group_size: int = 128
    ) -> CausalLM:
        """Load a Hugging Face or native checkpoint directory; see `moeformer.models.checkpoint.load_pretrained`."""
        return checkpoint.load_pretrained(
            cls, path, dtype=dtype, device=device, quantize=quantize, group_size=group_size
        )

    def save_pretrained(self, path, format: str = "hf", max_shard_size: int | str = "5GB", **kwargs):
        """Write an atomic checkpoint directory; see `moeformer.models.checkpoint.save_pretrained`."""
        return checkpoint.save_pretrained(self, path, format=format, max_shard_size=max_shard_size, **kwargs)


from_pretrained = CausalLM.from_pretrained  # moeformer.from_pretrained(path, dtype=..., quantize=...)


def _cache_length(cache: list | None) -> int:
    if not cache:
        return 0
    return cache[0].length


def _default_positions(
    batch: int, seq: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Positions past..past+seq, or counted over real tokens only when a (left-)padding mask is given."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device).expand(batch, seq)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, past:].clamp(min=0)


def _shift_labels(labels: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Targets for each position: the next label, -100 at the end and across document boundaries."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if document_ids is not None:
        crosses = document_ids[:, 1:] != document_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def build_model(
    config: ModelConfig | str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> CausalLM:
    """A randomly initialised model (from torch's global RNG) built directly on `device` in `dtype`.

    `config` may be a zoo name. On the meta device nothing is allocated or initialised (for loading and counting).
    """
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    device = torch.device(device if device is not None else "cpu")
    with device:
        model = CausalLM(config)
    if device.type != "meta":
        model.init_weights()
    if dtype is not None:
        model.to(dtype)
        model.reset_buffers()
    return model


def compile_blocks(model: nn.Module, skip: Sequence[nn.Module] = (), **compile_kwargs) -> None:
    """torch.compile each transformer block and the LM head of `model` (a `CausalLM`, or the part of one that a
    pipeline stage holds) in place (`nn.Module.compile`: parameter names keep no `_orig_mod.` prefix), except the
    modules in `skip`. One graph per block kind, reused by every block: faster to build than a whole-model graph
    and, on an H100, 4-5% faster to train (scripts/bench_train.py --compile-scope)."""
    for name, module in model.named_modules():
        if (isinstance(module, Block) or name.rsplit(".", 1)[-1] == "lm_head") and not any(module is s for s in skip):
            module.compile(**compile_kwargs)
