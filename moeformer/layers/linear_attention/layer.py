"""LinearAttention: a drop-in token mixer (vanilla / RetNet / GLA / DeltaNet) with chunked training and O(1) decoding.

State format (what a cache carries per layer): one fp32 tensor (B, n_heads, feature_dim, head_dim [+1 if normalize]),
the decayed sum of phi(k) v^T (last column: the running phi(k) sum used as denominator); for DeltaNet the
delta-rule memory (B, n_heads, feature_dim, head_dim). It is replaced, not mutated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moeformer.layers.linear_attention.decayed import (
    check_chunk_size,
    decayed_linear_attn_chunked,
    decayed_linear_attn_naive,
    decayed_linear_attn_recurrent,
    gla_log_decay,
    retnet_log_decay,
)
from moeformer.layers.linear_attention.delta import delta_rule_chunked, delta_rule_naive, delta_rule_recurrent
from moeformer.layers.linear_attention.fla_backend import (
    fla_available,
    fla_chunk_bthd,
    fla_delta_rule_bthd,
    fla_gated_backward_ok,
)
from moeformer.layers.linear_attention.vanilla import build_feature_map
from moeformer.layers.norms import RMSNorm

KINDS = ("vanilla", "retnet", "gla", "deltanet")  # vanilla: a feature map and no decay (Katharopoulos et al.)
BACKENDS = ("auto", "chunked", "recurrent", "naive", "fla")
_DECAYED_FORMS = {
    "chunked": decayed_linear_attn_chunked,
    "recurrent": decayed_linear_attn_recurrent,
    "naive": decayed_linear_attn_naive,
    "fla": fla_chunk_bthd,
}
_DELTA_FORMS = {
    "chunked": delta_rule_chunked,
    "recurrent": delta_rule_recurrent,
    "naive": delta_rule_naive,
    "fla": fla_delta_rule_bthd,
}


class LinearAttention(nn.Module):
    """Multi-head linear attention: q/k/v projections, feature map, linear-attention core, per-head RMSNorm on the
    output (optional), output projection.

    kind: "vanilla" (no decay), "retnet" (fixed per-head decay), "gla" (data-dependent per-head decay from
    `decay_proj`), "deltanet" (delta rule on L2-normalised q, k with per-token `beta_proj` strengths).
    feature_map: "elu" | "relu" | "identity" | "performer"; None picks "elu" for vanilla, else "identity".
    normalize divides by phi(q) . sum phi(k) (needs a non-negative map; not for deltanet).
    backend: "chunked" / "recurrent" / "naive" (PyTorch), "fla" (fla-core kernel, CUDA), "auto" (recurrent for
    single-token steps, fla when importable on CUDA (deltanet: fp16/bf16 only; gla with gradients: only where fla's
    gated backward is supported), else chunked).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        *,
        kind: str = "vanilla",
        feature_map: str | None = None,
        normalize: bool = False,
        num_features: int | None = None,
        chunk_size: int = 64,
        backend: str = "auto",
        output_norm: bool = True,
        norm_eps: float = 1e-6,
        eps: float = 1e-6,
        gate_logit_normalizer: float = 16.0,
        bias: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown linear attention kind {kind!r}; expected one of {KINDS}")
        _check_backend(backend)
        if min(dim, n_heads, head_dim) < 1:
            raise ValueError(f"dim, n_heads and head_dim must be positive, got {dim}, {n_heads}, {head_dim}")
        check_chunk_size(chunk_size)
        feature_map = feature_map or ("elu" if kind == "vanilla" else "identity")
        self.feature_map = build_feature_map(feature_map, head_dim, num_features, seed)
        if normalize and kind == "deltanet":
            raise ValueError("normalize=True does not apply to the delta rule (kind='deltanet')")
        if normalize and not self.feature_map.non_negative:
            raise ValueError(
                f"normalize=True needs a non-negative feature map (elu, relu, performer), got {feature_map!r}"
            )
        self.n_heads, self.head_dim, self.kind, self.backend = n_heads, head_dim, kind, backend
        self.normalize, self.eps, self.chunk_size = normalize, eps, chunk_size
        self.gate_logit_normalizer = gate_logit_normalizer
        self.scale = self.feature_map.out_dim**-0.5
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.decay_proj = nn.Linear(dim, n_heads, bias=True) if kind == "gla" else None
        self.beta_proj = nn.Linear(dim, n_heads, bias=False) if kind == "deltanet" else None
        self.out_norm = RMSNorm(head_dim, norm_eps) if output_norm else None

    def init_state(
        self, batch: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Zero recurrent state (B, H, feature_dim, head_dim [+1]); fp32 keeps long decodes exact."""
        width = self.head_dim + int(self.normalize)
        return torch.zeros(batch, self.n_heads, self.feature_map.out_dim, width, dtype=dtype, device=device)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """Log decays for the core in (B, T, H) layout: None (vanilla), (H,) (retnet) or (B, T, H) (gla)."""
        if self.kind == "retnet":
            return retnet_log_decay(self.n_heads, device=x.device)
        if self.kind == "gla":
            return gla_log_decay(self.decay_proj(x), self.gate_logit_normalizer)
        return None

    def resolve_backend(self, backend: str, x: torch.Tensor) -> str:
        """The concrete form a forward will use."""
        if _check_backend(backend) != "auto":
            return backend
        if x.shape[1] == 1:
            return "recurrent"
        if not (x.is_cuda and fla_available()):
            return "chunked"
        if self.kind == "deltanet" and x.dtype not in (torch.float16, torch.bfloat16):
            return "chunked"
        if self.kind == "gla" and torch.is_grad_enabled() and not fla_gated_backward_ok():
            return "chunked"
        return "fla"

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim) -> (y (B, T, dim), new state, or None when no `state` was passed).

        Pass `state=init_state(...)` to prefill and the returned state to continue decoding. `document_ids` (B, T)
        resets the state where a new document starts (packed rows); `backend` overrides the constructor's.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, dim), got shape {tuple(x.shape)}")
        q, k, v = (
            rearrange(proj(x), "b t (h d) -> b t h d", d=self.head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = self.feature_map(q), self.feature_map(k)
        options = dict(
            scale=self.scale, initial_state=state, output_final_state=state is not None, document_ids=document_ids
        )
        if self.kind == "deltanet":
            q, k = (F.normalize(t.float(), dim=-1).to(t.dtype) for t in (q, k))
            gate, forms = torch.sigmoid(self.beta_proj(x)), _DELTA_FORMS
        else:
            gate, forms = self.log_decay(x), _DECAYED_FORMS
            options.update(normalize=self.normalize, eps=self.eps)
        backend = self.resolve_backend(backend or self.backend, x)
        if backend == "fla":
            o, new_state = forms[backend](q, k, v, gate, **options)
        else:
            if backend == "chunked":
                options["chunk_size"] = self.chunk_size
            gate = gate.transpose(1, 2) if gate is not None and gate.dim() == 3 else gate
            o, new_state = forms[backend](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate, **options)
            o = o.transpose(1, 2)
        if self.out_norm is not None:
            o = self.out_norm(o)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)")), new_state


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear attention backend {backend!r}; expected one of {BACKENDS}")
    return backend
