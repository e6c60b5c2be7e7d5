"""Micro-benchmark of weight-only quantized matmuls and of the MoE decode path, on one GPU, as one table.

Matmuls: x (M, K) @ W^T for W (N, K), bf16 F.linear (cuBLAS) against our Triton kernels with int8 and int4
(group 128) weights, at M = 1, 8, 64, 2048. MoE: an OLMoE-like layer (dim 2048, 64 experts top-8, F 1024) at
decode batches 1, 8, 64: the generic sorted path (grouped GEMM), and the fused path with bf16, int8 and int4
experts, each timed eagerly and replayed in a CUDA graph (what a compiled decode step runs), with its CUDA kernel
count per call. Times are triton.testing medians; GB/s counts the weight bytes read (MoE: the chosen experts) plus
activations, against a device copy measured in the same run.

    python scripts/bench_quant.py [--sweep] [--out benchmarks/quant.md]

--sweep also tries alternative tile configurations at batch 1 (the quantized GEMV at M = 1, the fused expert
kernels at one token) and prints the fastest per row, for tuning the constants in
moeformer/layers/quant/triton_kernels.py and moeformer/layers/moe/fused_experts_triton.py (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools

import torch
import torch.nn.functional as F
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
DIM, EXPERTS, TOP_K, FFN = 2048, 64, 8, 1024  # the OLMoE-like MoE layer
BATCHES = [1, 8, 64]
MODES = ["bf16", "int8", "int4"]
BITS = {"bf16": 0, "int8": 8, "int4": 4}


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


def matmul_rows(table: list, bandwidth: float, sweep: bool) -> None:
    for (name, k, n), m in itertools.product(MATMULS, ROWS):
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base_ms = None
        for mode in MODES:
            if mode == "bf16":
                module, fn = linear, lambda: F.linear(x, linear.weight)
            else:
                module = QuantLinear.from_linear(linear, mode, 128)
                fn = lambda module=module: module(x)  # noqa: E731
            with torch.no_grad():
                ms = do_bench(fn)
            base_ms = base_ms or ms
            moved = weight_bytes(module) + 2 * (m * k + m * n)
            note = ""
            if mode != "bf16":
                bits = BITS[mode]
                cfg = matmul_kernels.matmul_config(m, n, k, bits, 128)
                note = f"{cfg.bm}x{cfg.bn}x{cfg.bk} split {cfg.split} w{cfg.num_warps} s{cfg.num_stages}"
                if sweep and m == 1:
                    best = sweep_matmul(module, x, m, n, k, bits)
                    note += f"; best {best[1]} {best[0] * 1e3:.1f} us"
            row(table, what=f"linear {name}", rows=m, mode=mode, us=f"{ms * 1e3:.1f}", speedup=f"{base_ms / ms:.2f}x",
                gbps=f"{moved / (ms * 1e-3) / 1e9:.0f}", roofline=f"{moved / (ms * 1e-3) / bandwidth:.0%}",
                kernels="", config=note)


def sweep_matmul(module: QuantLinear, x: torch.Tensor, m: int, n: int, k: int, bits: int):
    best = (float("inf"), None)
    for bn, bk, split, stages in itertools.product((16, 32, 64), (128, 256), (1, 2, 4, 8), (3, 4)):
        bk = min(bk, 128) if bits == 4 else bk
        cfg = matmul_kernels.MatmulConfig(16, bn, bk, split, 4, stages)
        with patched(matmul_kernels, "matmul_config", lambda *args, cfg=cfg: cfg), torch.no_grad():
            try:
                ms = do_bench(lambda: module(x))
            except Exception:  # a configuration the GPU cannot run (shared memory): skip it
                continue
        best = min(best, (ms, f"16x{bn}x{bk} split {split} s{stages}"), key=lambda t: t[0])
    return best


def moe_layer(mode: str) -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, MoEConfig(num_experts=EXPERTS, top_k=TOP_K, ffn_dim=FFN, norm_topk_prob=False))
    layer = layer.to("cuda", torch.bfloat16).eval().requires_grad_(False)
    if mode != "bf16":
        layer.experts.quantize_(mode, 128)
    return layer


def moe_rows(table: list, bandwidth: float, sweep: bool) -> None:
    for batch in BATCHES:
        x = torch.randn(batch, 1, DIM, device="cuda", dtype=torch.bfloat16)
        base_ms = None
        for mode in ["generic", *MODES]:
            layer = moe_layer("bf16" if mode == "generic" else mode)
            chosen = layer.router(x.view(-1, DIM)).expert_idx.unique().numel()
            moved = weight_bytes(layer.router) + chosen * (weight_bytes(layer.experts) // EXPERTS) + 4 * x.numel()
            fn = lambda layer=layer: layer(x, stats=False)  # noqa: E731
            generic = patched(layer.experts, "use_fused", lambda *a: False) if mode == "generic" else \
                contextlib.nullcontext()
            with torch.no_grad(), generic:
                eager_ms = do_bench(fn)
                graph_ms = do_bench_cudagraph(fn)
                kernels = kernel_count(fn)
            base_ms = base_ms or graph_ms
            note = f"eager {eager_ms * 1e3:.1f} us"
            if mode != "generic":
                cfg = experts_kernels.experts_config(batch * TOP_K, EXPERTS, DIM, FFN, BITS[mode], 128, False)
                note += f"; {cfg.rows} bm {cfg.bm} up {cfg.bn_up}x{cfg.bk_up} down {cfg.bn_down}x{cfg.bk_down} " \
                        f"split {cfg.split} w{cfg.num_warps} s{cfg.num_stages}"
                if sweep and batch == 1:
                    best = sweep_experts(layer, x, batch, mode)
                    note += f"; best {best[1]} {best[0] * 1e3:.1f} us"
            row(table, what=f"MoE decode olmoe ({chosen} experts)", rows=batch, mode=mode,
                us=f"{graph_ms * 1e3:.1f}", speedup=f"{base_ms / graph_ms:.2f}x",
                gbps=f"{moved / (graph_ms * 1e-3) / 1e9:.0f}", roofline=f"{moved / (graph_ms * 1e-3) / bandwidth:.0%}",
                kernels=kernels, config=note)


def sweep_experts(layer: MoE, x: torch.Tensor, batch: int, mode: str):
    bits = BITS[mode]
    default = experts_kernels.experts_config(batch * TOP_K, EXPERTS, DIM, FFN, bits, 128, False)
    best = (float("inf"), None)
    for bn_up, bn_down, split, stages in itertools.product((16, 32, 64), (32, 64), (1, 2, 4), (3, 4)):
        cfg = dataclasses.replace(default, bn_up=bn_up, bn_down=bn_down, split=split, num_stages=stages)
        with patched(experts_kernels, "experts_config", lambda *args, cfg=cfg: cfg), torch.no_grad():
            try:
                ms = do_bench_cudagraph(lambda: layer(x, stats=False))
            except Exception:  # a configuration the GPU cannot run: skip it
                continue
        label = f"up {bn_up}x{cfg.bk_up} down {bn_down}x{cfg.bk_down} split {split} s{stages}"
        best = min(best, (ms, label), key=lambda t: t[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also search tile configurations (slow)")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device copy {bandwidth / 1e12:.2f} TB/s")
    table: list[dict] = []
    print("what | rows | mode | us | speedup | GB/s | roofline | kernels | config")
    matmul_rows(table, bandwidth, args.sweep)
    moe_rows(table, bandwidth, args.sweep)
    if args.out:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in table]
        with open(args.out, "w") as f:
            f.write(f"Copy bandwidth {bandwidth / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
