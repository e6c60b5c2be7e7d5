"""The FP8 quantisers' Triton kernels (moeformer/layers/moe/fp8_triton.py) at the shapes of one MoE layer's training
step, by default medium-moe's (dim 1024, 16 experts top-2, expert width 1536 with swiglu: w_in (16, 1024, 3072), w_out
(16, 1536, 1024); 16,384 tokens -> 32,768 expert rows in uneven groups), as a markdown table: microseconds per call
(triton.testing.do_bench: L2 flushed before each call, the median), the bytes that one read of the inputs and one
write of the outputs move, their rate and its share of the device copy bandwidth measured in the same run; then the
sum over what one layer's training step quantises (fp8_grouped_mm with FP8 weight gradients: x, h and both output
gradients by rows with their column amax, the same four by columns, both weights). Only launchers that every version
of fp8_triton.py has, so that versions can be compared.

    python scripts/bench_fp8_quant.py [--rows 32768] [--dim 1024] [--ffn 1536] [--experts 16]
"""

from __future__ import annotations

import argparse

import torch
from bench_quant import copy_bandwidth  # scripts/ is on sys.path when this file runs as a script
from triton.testing import do_bench

from moeformer.layers.moe.fp8_gemm import aligned_rows
from moeformer.layers.moe.fp8_triton import (
    quantize_columns,
    quantize_rows,
    quantize_rows_and_column_amax,
    quantize_weight,
)


def uneven_offs(rows: int, experts: int) -> torch.Tensor:
    """Group ends of `rows` expert-sorted rows over `experts` groups of sizes 0.5x..1.5x the mean (seeded)."""
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(0)) + 0.5
    ends = torch.cumsum(weights / weights.sum() * rows, 0).floor().long()
    ends[-1] = rows
    return ends.to(torch.int32).cuda()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768, help="expert rows of a layer (tokens x top_k)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=1536, help="an expert's width (w_in has 2x: swiglu)")
    parser.add_argument("--experts", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_quant.py needs a CUDA GPU")
    r, d, f, e = args.rows, args.dim, args.ffn, args.experts
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    acts = {width: torch.randn(r, width, **bf16) for width in sorted({d, f, 2 * f})}  # x, h, grad of w_in's output
    w_in, w_out = torch.randn(e, d, 2 * f, **bf16), torch.randn(e, f, d, **bf16)
    offs = uneven_offs(r, e)
    source, _ = aligned_rows(offs, r)
    amax = {width: t.abs().amax(0).float() for width, t in acts.items()}
    p = source.shape[0]
    per_step = [d, f, 2 * f, d].count  # activations of each width a layer's step quantises: x, h and two gradients
    cases = []  # (launcher, operand, call, bytes read and written once, calls in a layer's training step)
    for width, t in acts.items():
        cases.append(("quantize_rows", f"({r}, {width})", lambda t=t: quantize_rows(t), 3 * t.numel() + 4 * r, 0))
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        wt = w.transpose(-2, -1)  # the forward's weight when x needs no gradient
        moved = 3 * w.numel() + 4 * e * wt.shape[1]
        cases.append(("quantize_rows", f"{name}^T {tuple(wt.shape)}", lambda wt=wt: quantize_rows(wt), moved, 0))
    for width, t in acts.items():
        call = lambda t=t: quantize_rows_and_column_amax(t, offs)  # noqa: E731
        moved = 3 * t.numel() + 4 * (r + width)
        cases.append(("quantize_rows_and_column_amax", f"({r}, {width})", call, moved, per_step(width)))
    for width, t in acts.items():
        call = lambda t=t, a=amax[width]: quantize_columns(t, source, offs, a)  # noqa: E731
        moved = 2 * t.numel() + p * width + 8 * p + 8 * width
        operand = f"({r}, {width}) -> ({width}, {p})"
        cases.append(("quantize_columns (amax given)", operand, call, moved, per_step(width)))
    t = acts[d]
    moved = 2 * t.numel() + p * d + 8 * p + 4 * d
    call = lambda: quantize_columns(t, source, offs, None)  # noqa: E731
    cases.append(("quantize_columns (amax pass)", f"({r}, {d}) -> ({d}, {p})", call, moved, 0))
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        moved = 4 * w.numel() + 4 * e * sum(w.shape[1:])
        cases.append(("quantize_weight", f"{name} {tuple(w.shape)}", lambda w=w: quantize_weight(w), moved, 1))

    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device copy {bandwidth / 1e12:.2f} TB/s\n")
    print("| launcher | operand | us | MB moved | TB/s | of copy |\n|---|---|---|---|---|---|")
    step_us = 0.0
    for launcher, operand, call, moved, calls in cases:
        us = do_bench(call, return_mode="median") * 1e3
        step_us += calls * us
        rate = moved / (us * 1e-6)
        print(f"| {launcher} | {operand} | {us:.1f} | {moved / 1e6:.1f} | {rate / 1e12:.2f} | {rate / bandwidth:.0%} |")
    print(f"\na layer's training step quantises in {step_us:.0f} us")


if __name__ == "__main__":
    main()
