"""Where the FP8 grouped GEMM's time goes, on one GPU (compute capability 9.0/10.x): each quantiser of
moeformer/layers/moe/fp8_gemm.py as its Triton kernel and as the PyTorch reference (eager and torch.compile'd), in
ms and GB/s of its reads and writes, then the three GEMMs alone (fp8 vs bf16) and fp8_grouped_mm's forward+backward
(FP8 and bf16 weight gradients) against torch._grouped_mm's, compiled.

    python scripts/bench_fp8.py [--rows 131072] [--dim 2048] [--ffn 2048] [--experts 64]

The defaults are the OLMoE-like layer's first expert GEMM (T=16384 tokens x k=8 rows, d=2048 -> 2f=2048, E=64)."""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from moeformer.layers.moe import fp8_gemm, fp8_triton
from moeformer.layers.moe.fp8_gemm import (
    aligned_rows,
    column_amax_reference,
    fp8_grouped_mm,
    quantize_columns_reference,
    quantize_rows_reference,
    scaled_grouped_mm,
)


def report(name: str, ms: float, nbytes: int | None = None) -> None:
    rate = f"{nbytes / ms / 1e6:8.0f} GB/s" if nbytes else ""
    print(f"| {name:<58} | {ms:8.3f} | {rate:>13} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=131072, help="rows of the sorted buffer (tokens x top_k)")
    parser.add_argument("--dim", type=int, default=2048, help="K of the GEMM")
    parser.add_argument("--ffn", type=int, default=2048, help="N of the GEMM")
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not fp8_gemm.fp8_grouped_mm_available(torch.device("cuda")):
        raise SystemExit("bench_fp8.py needs a CUDA GPU of compute capability 9.0 or 10.x")
    m, k, n, e = args.rows, args.dim, args.ffn, args.experts
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16) / k**0.5
    grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    sizes = torch.distributions.Dirichlet(torch.ones(e)).sample() * m  # uneven groups, as routing gives
    offs = torch.cumsum(sizes.floor().long(), 0).clamp(max=m).to(torch.int32).cuda()
    offs[-1] = m
    source, _ = aligned_rows(offs, m)
    kernels = fp8_triton
    compiled = {f.__name__: torch.compile(f) for f in (quantize_rows_reference, quantize_columns_reference)}

    def rowwise(t: torch.Tensor) -> tuple:
        """The rowwise quantiser's three forms on t, and the bytes it reads and writes."""
        return (
            lambda: kernels.quantize_rows(t),
            lambda: quantize_rows_reference(t),
            lambda: compiled["quantize_rows_reference"](t),
            t.numel() * 3,
        )

    compiled_amax = torch.compile(lambda t, o: (*quantize_rows_reference(t), column_amax_reference(t, o)))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, M={m}, K={k}, N={n}, E={e}")
    print("| what | ms | bandwidth |\n|---|---|---|")
    cases = {  # name: (triton, reference, compiled reference, bytes read + written)
        "x rowwise (forward)": rowwise(x),
        "x rowwise + column amax (forward, fp8 wgrad)": (
            lambda: kernels.quantize_rows_and_column_amax(x, offs),
            None,
            lambda: compiled_amax(x, offs),
            x.numel() * 3,
        ),
        "w per output column, (E, N, K) codes (forward)": rowwise(w.transpose(-2, -1)),
        "w per row, (E, K, N) codes (grad_input)": rowwise(w),
        "w in both layouts from one read (forward)": (
            lambda: kernels.quantize_weight(w),
            None,
            None,
            w.numel() * 4,
        ),
        "x columnwise into the aligned layout (wgrad, amax known)": (
            lambda: kernels.quantize_columns(x, source, offs, x.abs().amax(0).float()),
            None,
            None,
            x.numel() * 3,
        ),
        "x columnwise into the aligned layout (wgrad, own amax pass)": (
            lambda: kernels.quantize_columns(x, source, offs, None),
            lambda: quantize_columns_reference(x, source),
            lambda: compiled["quantize_columns_reference"](x, source),
            x.numel() * 5,
        ),
    }
    for name, (triton_fn, reference, compiled_fn, nbytes) in cases.items():
        report(f"{name}: triton", do_bench(triton_fn), nbytes)
        if reference is not None:
            report(f"{name}: pytorch", do_bench(reference), nbytes)
        if compiled_fn is not None:
            report(f"{name}: pytorch compiled", do_bench(compiled_fn), nbytes)
    xq, xs = kernels.quantize_rows(x)
    wq, ws = kernels.quantize_rows(w.transpose(-2, -1))
    report("GEMM x @ w: fp8", do_bench(lambda: scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs, True)))
    report("GEMM x @ w: bf16", do_bench(lambda: torch._grouped_mm(x, w, offs=offs)))
    report("GEMM x^T @ grad (wgrad): bf16", do_bench(lambda: torch._grouped_mm(x.t(), grad, offs=offs)))
    report("GEMM x^T @ grad (wgrad): fp8 incl. quantisation", do_bench(lambda: fp8_gemm.weight_grad(x, grad, offs)))

    def step(fn, **kwargs):
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        fn(xg, wg, offs=offs, **kwargs).backward(grad)

    fp8_step = torch.compile(fp8_grouped_mm)
    bf16_step = torch.compile(lambda a, b, offs: torch._grouped_mm(a, b, offs=offs))
    report("fwd+bwd: torch._grouped_mm bf16, compiled", do_bench(lambda: step(bf16_step)))
    report("fwd+bwd: fp8_grouped_mm, compiled", do_bench(lambda: step(fp8_step)))
    report("fwd+bwd: fp8_grouped_mm bf16 wgrad, compiled", do_bench(lambda: step(fp8_step, fp8_wgrad=False)))


if __name__ == "__main__":
    main()
