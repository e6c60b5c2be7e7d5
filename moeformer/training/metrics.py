"""Training metrics: FLOPs per token and MFU, expert-load summaries, and a JSONL + TensorBoard logger (rank 0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeformer.models.config import LINEAR_ATTENTION, MLA_ATTENTION, ModelConfig
from moeformer.models.params import count_params

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x active matmul params + each layer's token
    mixing (`mixing_flops_per_token`).

    Active params count routed experts at top_k / num_experts and exclude the embedding lookup (no matmul); the
    LM head is included.
    """
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.dim  # tied: the table is the LM head
    active = count_params(config).active - embedding
    return 6.0 * active + sum(mixing_flops_per_token(config, layer, seq_len) for layer in range(config.n_layers))


def mixing_flops_per_token(config: ModelConfig, layer: int, seq_len: int) -> float:
    """Training FLOPs per token of layer `layer`'s attention beyond its projections. Softmax attention and MLA:
    QK^T and AV over the keys a query sees (all `seq_len`, or the sliding window), 6 * heads * keys * (qk_dim +
    v_dim), no causal discount (the PaLM convention). Linear attention: its recurrent state, independent of
    `seq_len`: per head, the state update and the readout (plus the delta rule's correction read) of
    feature_dim x head_dim each, 2 FLOPs per multiply-add, times 3."""
    kind = config.attention_type(layer)
    heads = config.n_heads
    if kind == MLA_ATTENTION:
        mla = config.mla
        return 6.0 * heads * seq_len * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    if kind in LINEAR_ATTENTION:
        options = config.linear_attention
        features = (
            (options.get("num_features") or config.head_dim)
            if options.get("feature_map") == "performer"
            else config.head_dim
        )
        state_products = 3 if kind == "deltanet" else 2
        return 3.0 * 2 * state_products * heads * features * config.head_dim
    keys = min(seq_len, config.sliding_window) if config.sliding_window else seq_len
    return 6.0 * heads * keys * 2 * config.head_dim


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else a known GPU's bf16 peak, else None (no MFU, e.g. on CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib() -> float:
    """Peak allocated accelerator memory since the last reset (GiB); max resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def expert_load(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Share of routed token slots each expert received, per layer: (layers, experts) rows summing to 1."""
    counts = tokens_per_expert.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)


def expert_load_summary(tokens_per_expert: torch.Tensor, dropped: torch.Tensor) -> dict[str, list]:
    """Per MoE layer, from one step's exact slot counts over all ranks (tokens_per_expert (layers, experts) routed
    slots, dropped (layers,) slots the capacity limit cut): the most slots an expert received, the mean per expert,
    their ratio (1 = balanced), the number of experts that received none, and the dropped slots and their share of
    the routed ones. Lists of one value per layer; counts are integers."""
    counts = tokens_per_expert.round().long()
    dropped = dropped.round().long()
    routed = counts.sum(dim=-1)
    mean = routed.double() / counts.shape[-1]
    peak = counts.amax(dim=-1)
    return {
        "expert_tokens_max": peak.tolist(),
        "expert_tokens_mean": mean.tolist(),
        "expert_load_max_over_mean": (peak / mean.clamp(min=1e-12)).where(routed > 0, 0.0).tolist(),
        "experts_without_tokens": (counts == 0).sum(dim=-1).tolist(),
        "dropped_tokens": dropped.tolist(),
        "dropped_share": (dropped.double() / routed.clamp(min=1)).tolist(),
    }


# summary lists with one value per MoE layer: TensorBoard scalars "<split>/<name>/layer<l>"
PER_LAYER_METRICS = (
    "expert_tokens_max",
    "expert_tokens_mean",
    "expert_load_max_over_mean",
    "experts_without_tokens",
    "dropped_tokens",
    "dropped_share",
)


class HostSyncs(TorchDispatchMode):
    """Counts, inside the block (`with HostSyncs() as syncs: ...; syncs.count`), the times the host waits for the
    device. On CUDA: the synchronising CUDA runtime calls the profiler records (every thread, backward included).
    Elsewhere, what would sync on a device, in this thread: reading values (`.item()`, `bool()`: aten's
    _local_scalar_dense; `Tensor.tolist`, which does not dispatch, patched) and ops whose output size depends on
    the values (nonzero, masked_select, unique, repeat_interleave without output_size)."""

    CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
    SIZE_FROM_VALUES = (
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::unique_dim",
    )

    def __init__(self, cuda: bool | None = None) -> None:
        super().__init__()
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.count = 0

    def __enter__(self):
        self.count = 0
        if self.cuda:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profile.__enter__()
            return self
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self._profile.__exit__(*exc)
            self.count = sum(e.count for e in self._profile.key_averages() if e.key in self.CUDA_SYNCS) - 1
            return None  # the final torch.cuda.synchronize above is not the block's
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if (
            name == "aten::_local_scalar_dense"
            or name in self.SIZE_FROM_VALUES
            or (func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        ):
            self.count += 1
        return func(*args, **kwargs)


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Lists (expert load per layer) go to the JSONL only, with per-layer max/min load ratios and the per-layer load
    summaries (PER_LAYER_METRICS) as TensorBoard scalars.
    Only rank 0 writes; other ranks get a logger that does nothing.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # the `train` extra is not installed: JSONL only
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """Write `record` (must hold "step" and "split"); scalars are tagged "<split>/<name>" in TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            return
        step, split = record["step"], record["split"]
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self._writer.add_scalar(f"{split}/{name}", value, step)
        for layer, load in enumerate(record.get("expert_load", [])):
            self._writer.add_scalar(f"{split}/expert_load_max/layer{layer}", max(load) * len(load), step)
            self._writer.add_scalar(f"{split}/expert_load_min/layer{layer}", min(load) * len(load), step)
        for name in PER_LAYER_METRICS:
            for layer, value in enumerate(record.get(name, [])):
                self._writer.add_scalar(f"{split}/{name}/layer{layer}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
