"""The paged decode attention kernel (one query per sequence over a paged KV cache, `moeformer.layers.attention.
paged_triton`) at serving shapes: microseconds per call, the K/V bytes it reads per second and their share of the
device copy bandwidth measured in the same run, with the keys split over programs (the default) and whole; every
output checked against a gather + fp32 softmax reference first. bf16, OLMoE-like heads (16 x 128), blocks of 16,
each sequence's blocks shuffled over the pool.

    python scripts/bench_paged.py [--shapes 64x400,32x2080,1x2000,256x600] [--heads 16] [--head-dim 128]
"""

from __future__ import annotations

import argparse

import torch
from bench_quant import copy_bandwidth  # scripts/ is on sys.path when this file runs as a script
from triton.testing import do_bench

from moeformer.layers.attention import paged_triton


def case(rows: int, keys: int, heads: int, head_dim: int, block: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = -(-keys // block)
    slots = (rows * width + 1) * block
    k, v = (torch.randn(slots, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(rows, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
    tables = (torch.randperm(rows * width, device="cuda", generator=g) + 1).view(rows, width)
    return q, k, v, tables, torch.full((rows,), keys, device="cuda"), block


def reference(q, k, v, tables, lengths, block, scale: float) -> torch.Tensor:
    out = []
    for b in range(q.shape[0]):
        pos = torch.arange(int(lengths[b]), device=q.device)
        slots = tables[b, pos // block] * block + pos % block
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k[slots].float()) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v[slots].float()))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x400,32x2080,1x2000,256x600", help="ROWSxKEYS, comma separated")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paged.py measures the Triton kernel on a CUDA GPU; none is visible")
    bandwidth, scale = copy_bandwidth(), args.head_dim**-0.5
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device copy {bandwidth / 1e12:.2f} TB/s\n")
    print("| rows x keys | keys split (default) us | TB/s | of copy | whole us | TB/s | of copy | splits |")
    print("|---|---|---|---|---|---|---|---|")
    default = paged_triton.TARGET_PROGRAMS
    for shape in args.shapes.split(","):
        rows, keys = (int(x) for x in shape.split("x"))
        inputs = case(rows, keys, args.heads, args.head_dim, args.block_size)
        expected = reference(*inputs, scale)
        kv_bytes = 2 * rows * keys * args.heads * args.head_dim * 2
        cells = []
        for target in (default, 1):
            paged_triton.TARGET_PROGRAMS = target
            error = (paged_triton.launch(*inputs, scale, 0).float() - expected).abs().max().item()
            if error > 2**-6:
                raise SystemExit(f"{shape}: the kernel differs from the reference by {error:.3g}")
            us = do_bench(lambda inputs=inputs: paged_triton.launch(*inputs, scale, 0)) * 1e3
            cells += [f"{us:.1f}", f"{kv_bytes / us / 1e6:.2f}", f"{kv_bytes / (us * 1e-6) / bandwidth:.0%}"]
        paged_triton.TARGET_PROGRAMS = default
        print(f"| {shape} | " + " | ".join(cells) + f" | {paged_triton.num_splits(rows, args.heads)} |")


if __name__ == "__main__":
    main()
