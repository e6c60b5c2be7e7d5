"""Micro-benchmark of weight-only quantized matmuls and of the MoE decode path, on one GPU, as one table.

Matmuls: x (M, K) @ W^T for W (N, K), bf16 F.linear (cuBLAS) against our Triton kernels with int8 and int4
(group 128) weights, at M = 1, 8, 64, 2048. MoE: an OLMoE-like layer (dim 2048, 64 experts top-8, F 1024) at
decode batches 1, 8, 64: the generic sorted path (grouped GEMM), and the fused path with bf16, int8 and int4
experts, with its CUDA kernel count per call.

Every row is timed twice: eagerly (triton.testing.do_bench: host launch overhead included, L2 flushed) and as CUDA
graph replay (what a compiled decode step runs; the `us` column). A graph replays the call over a rotation of
distinct weights (linears: copies of the layer; MoE: inputs routed to different experts) of several L2 sizes, so
the weights stream from memory as they do in a decode step instead of staying in L2. A split-K matmul's partial
sums are reduced by a separate kernel in these timings (under torch.compile they fuse into the consumer). GB/s
counts the weight bytes read (MoE: the chosen experts) plus activations, against a device copy measured in the same
run.

    python scripts/bench_quant.py [--sweep] [--out benchmarks/quant.md]

--sweep also searches tile configurations (a coordinate search from the default: one knob at a time over its
candidates, keeping the fastest; a configuration whose output differs from the default's is rejected) for the
linears at M = 1 and M = 2048 and the fused experts at batch 1, and prints the fastest per row as a MatmulConfig /
ExpertsConfig to paste into matmul_config (moeformer/layers/quant/triton_kernels.py) and experts_config
(moeformer/layers/moe/fused_experts_triton.py). A few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from moeformer.layers.moe import MoE, MoEConfig
from moeformer.layers.moe import fused_experts_triton as experts_kernels
from moeformer.layers.quant import QuantLinear
from moeformer.layers.quant import triton_kernels as matmul_kernels

MATMULS = [  # (name, K, N)
    ("attn proj 2048x2048", 2048, 2048),
    ("expert gate|up 2048x(2*1024)", 2048, 2048),
    ("expert down 1024x2048", 1024, 2048),
    ("ffn up 4096x14336", 4096, 14336),
]
ROWS = [1, 8, 64, 2048]
SWEEP_ROWS = [1, 2048]
DIM, EXPERTS, TOP_K, FFN = 2048, 64, 8, 1024  # the OLMoE-like MoE layer
BATCHES = [1, 8, 64]
MODES = ["bf16", "int8", "int4"]
BITS = {"bf16": 0, "int8": 8, "int4": 4}
GROUP = 128
ROTATION_BYTES = 256 * 2**20  # weights a graph replay streams: several L2s (50 MB on an H200)
MAX_COPIES = 128
MOE_INPUTS = 8  # decode inputs a MoE graph replay rotates through (different experts each)

# Candidates of the coordinate search, per knob, in search order
DECODE_KNOBS = dict(
    bm=(1, 16), bn=(16, 32, 64, 128), bk=(32, 64, 128, 256), split=(1, 2, 4, 8), num_warps=(4, 8), num_stages=(2, 3, 4)
)
PREFILL_KNOBS = dict(bm=(64, 128), bn=(64, 128, 256), bk=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4, 5))
EXPERT_KNOBS = dict(
    bm=(1, 16),
    bn_up=(32, 64, 128),
    bk_up=(32, 64, 128),
    bn_down=(64, 128),
    bk_down=(32, 64, 128),
    split=(1, 2, 4),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def kernel_count(fn) -> int:
    """CUDA kernels launched by one call of fn."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def graph_ms(calls: list, rep: int = 20) -> float:
    """Milliseconds per call when the calls replay in sequence from one CUDA graph."""
    return do_bench_cudagraph(lambda: [call() for call in calls], rep=rep) / len(calls)


@contextlib.contextmanager
def patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def row(table: list, **cells) -> None:
    table.append(cells)
    print(" | ".join(f"{v}" for v in cells.values()), flush=True)


def coordinate_search(default, knobs: dict, valid, measure) -> tuple[float, object, float]:
    """(best ms, best config, default ms): from `default`, each knob in turn over its candidates, keeping the
    fastest valid configuration. `measure` returns inf for a configuration that fails or computes wrongly."""
    default_ms = best_ms = measure(default)
    best = default
    for name, values in knobs.items():
        for value in values:
            cfg = dataclasses.replace(best, **{name: value})
            if cfg != best and valid(cfg):
                ms = measure(cfg)
                if ms < best_ms:
                    best_ms, best = ms, cfg
    return best_ms, best, default_ms


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within bf16 rounding of the reference (another tiling sums in another order)."""
    return bool((out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max())


def measured(fn, calls: list, ref: torch.Tensor):
    """A `measure` for coordinate_search: graph time of `calls`, inf if fn's output differs from ref or it fails."""

    def measure(cfg) -> float:
        with cfg_patch(cfg), torch.no_grad():
            try:
                if not close(fn(), ref):
                    print(f"  rejected (wrong output): {cfg}", flush=True)
                    return math.inf
                return graph_ms(calls, rep=10)
            except Exception as e:  # a configuration the GPU cannot run (shared memory, registers): skip it
                print(f"  skipped ({type(e).__name__}): {cfg}", flush=True)
                return math.inf

    return measure


def cfg_patch(cfg):
    if isinstance(cfg, matmul_kernels.MatmulConfig):
        return patched(matmul_kernels, "matmul_config", lambda *args: cfg)
    return patched(experts_kernels, "experts_config", lambda *args: cfg)


def matmul_valid(m: int, k: int, bits: int):
    def valid(cfg: matmul_kernels.MatmulConfig) -> bool:
        dot = cfg.bm >= 16
        if bits == 4 and (cfg.bk > GROUP or (dot and cfg.bk < 32)):
            return False
        if dot and min(cfg.bn, cfg.bk) < 16 or not dot and cfg.bk * cfg.bn > 2 * matmul_kernels.GEMV_TILE:
            return False
        return cfg.split == 1 or (m <= 64 and k >= 2 * cfg.split * cfg.bk)

    return valid


def experts_valid(bits: int):
    def valid(cfg: experts_kernels.ExpertsConfig) -> bool:
        dot = cfg.bm >= 16
        for bk, bn in ((cfg.bk_up, cfg.bn_up), (cfg.bk_down, cfg.bn_down)):
            if bits == 4 and (bk > GROUP or (dot and bk < 32)):
                return False
            if dot and min(bn, bk) < 16 or not dot and bk * bn > 2 * matmul_kernels.GEMV_TILE:
                return False
        return FFN >= 2 * cfg.split * cfg.bk_down

    return valid


def linear_calls(mode: str, k: int, n: int, x: torch.Tensor) -> tuple[list, int]:
    """(calls of distinct copies of one layer, enough to stream ROTATION_BYTES at decode sizes (prefill is
    compute-bound: one copy); bytes of one copy)."""
    calls, size = [], None
    copies = MAX_COPIES if x.shape[0] <= 64 else 1
    while size is None or (len(calls) * size < ROTATION_BYTES and len(calls) < copies):
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        if mode == "bf16":
            module, call = linear, lambda w=linear.weight: F.linear(x, w)
        else:
            module = QuantLinear.from_linear(linear, mode, GROUP)
            call = lambda module=module: module(x)  # noqa: E731
        size = weight_bytes(module)
        calls.append(call)
    return calls, size


def matmul_rows(table: list, best: list, bandwidth: float, sweep: bool) -> None:
    for (name, k, n), m in itertools.product(MATMULS, ROWS):
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base_ms = None
        for mode in MODES:
            calls, size = linear_calls(mode, k, n, x)
            with torch.no_grad():
                eager_ms, ms = do_bench(calls[0]), graph_ms(calls)
            base_ms = base_ms or ms
            moved = size + 2 * (m * k + m * n)
            note = f"eager {eager_ms * 1e3:.1f} us"
            if mode != "bf16":
                bits = BITS[mode]
                cfg = matmul_kernels.matmul_config(m, n, k, bits, GROUP)
                note += f"; {cfg.bm}x{cfg.bn}x{cfg.bk} split {cfg.split} w{cfg.num_warps} s{cfg.num_stages}"
                if sweep and m in SWEEP_ROWS:
                    with torch.no_grad():
                        ref = calls[0]()
                    knobs = DECODE_KNOBS if m <= 16 else PREFILL_KNOBS
                    fastest = coordinate_search(cfg, knobs, matmul_valid(m, k, bits), measured(calls[0], calls, ref))
                    best.append((f"linear {name}, M={m}, {mode}", *fastest))
                    note += f"; best {fastest[0] * 1e3:.1f} us"
            row(
                table,
                what=f"linear {name}",
                rows=m,
                mode=mode,
                us=f"{ms * 1e3:.1f}",
                speedup=f"{base_ms / ms:.2f}x",
                gbps=f"{moved / (ms * 1e-3) / 1e9:.0f}",
                roofline=f"{moved / (ms * 1e-3) / bandwidth:.0%}",
                kernels="",
                config=note,
            )
            del calls


def moe_layer(mode: str) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_dim=FFN, norm_topk_prob=False))
    layer = layer.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    if mode != "bf16":
        layer.experts.quantize_(mode, GROUP)
    return layer


def moe_rows(table: list, best: list, bandwidth: float, sweep: bool) -> None:
    for batch in BATCHES:
        inputs = [torch.randn(batch, 1, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(MOE_INPUTS)]
        base_ms = None
        for mode in ["generic", *MODES]:
            layer = moe_layer("bf16" if mode == "generic" else mode)
            chosen = sum(layer.router(x.view(-1, DIM)).expert_idx.unique().numel() for x in inputs) / len(inputs)
            moved = weight_bytes(layer.router) + chosen * (weight_bytes(layer.experts) // EXPERTS) + 4 * batch * DIM
            calls = [lambda x=x, layer=layer: layer(x, stats=False)[0] for x in inputs]
            generic = (
                patched(layer.experts, "use_fused", lambda *a: False) if mode == "generic" else contextlib.nullcontext()
            )
            with torch.no_grad(), generic:
                eager_ms = do_bench(calls[0])
                ms = graph_ms(calls)
                kernels = kernel_count(calls[0])
            base_ms = base_ms or ms
            note = f"eager {eager_ms * 1e3:.1f} us"
            if mode != "generic":
                cfg = experts_kernels.experts_config(batch, batch * TOP_K, EXPERTS, DIM, FFN, BITS[mode], GROUP, False)
                note += (
                    f"; {cfg.rows} bm {cfg.bm} up {cfg.bn_up}x{cfg.bk_up} down {cfg.bn_down}x{cfg.bk_down} "
                    f"split {cfg.split} w{cfg.num_warps} s{cfg.num_stages}"
                )
                if sweep and batch == 1:
                    with torch.no_grad():
                        ref = calls[0]()
                    fastest = coordinate_search(
                        cfg, EXPERT_KNOBS, experts_valid(BITS[mode]), measured(calls[0], calls, ref)
                    )
                    best.append((f"MoE decode batch {batch}, {mode}", *fastest))
                    note += f"; best {fastest[0] * 1e3:.1f} us"
            row(
                table,
                what=f"MoE decode olmoe ({chosen:.0f} experts)",
                rows=batch,
                mode=mode,
                us=f"{ms * 1e3:.1f}",
                speedup=f"{base_ms / ms:.2f}x",
                gbps=f"{moved / (ms * 1e-3) / 1e9:.0f}",
                roofline=f"{moved / (ms * 1e-3) / bandwidth:.0%}",
                kernels=kernels,
                config=note,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also search tile configurations (a few minutes)")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"device copy {bandwidth / 1e12:.2f} TB/s"
    )
    table: list[dict] = []
    best: list[tuple] = []
    print("what | rows | mode | us (graph) | speedup | GB/s | roofline | kernels | config")
    matmul_rows(table, best, bandwidth, args.sweep)
    moe_rows(table, best, bandwidth, args.sweep)
    if best:
        print("\nFastest configurations found (graph replay; paste into matmul_config / experts_config):")
        for what, ms, cfg, default_ms in best:
            print(f"# {what}: {ms * 1e3:.1f} us (default {default_ms * 1e3:.1f} us)\n{cfg!r}")
    if args.out:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in table]
        with open(args.out, "w") as f:
            f.write(f"Copy bandwidth {bandwidth / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
