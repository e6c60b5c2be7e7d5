"""Training throughput of zoo models on one device: tokens/s and MFU for a fixed number of steps.

    python scripts/bench_train.py [--models medium-moe,medium-dense] [--seq-len 4096] [--batch 8] [--steps 20]

bf16 weights, fused AdamW, `torch.compile` (unless --no-compile), the `auto` attention backend, random token ids
(throughput does not depend on the text). MFU counts active parameters only (moeformer.training.metrics).
"""

from __future__ import annotations

import argparse
import time

import torch

from moeformer import ModelConfig, build_model, count_params
from moeformer.training.metrics import flops_per_token, peak_flops


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Wall-clock throughput over `steps` timed steps after `warmup` untimed ones (compilation, allocator)."""
    config = ModelConfig.from_name(name, max_seq_len=max(args.seq_len, ModelConfig.from_name(name).max_seq_len))
    model = build_model(config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = model if args.no_compile else torch.compile(model)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)

    def step() -> None:
        loss = step_fn(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = args.batch * args.seq_len * args.steps / seconds
    peak = peak_flops()
    params = count_params(config)
    return {
        "model": name,
        "total": params.total,
        "active": params.active,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token(config, args.seq_len) / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="medium-moe,medium-dense")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)  # 32k tokens per step at seq 4096
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"date {time.strftime('%Y-%m-%d')}, seq {args.seq_len}, batch {args.batch}, steps {args.steps}, "
          f"{'eager' if args.no_compile else 'compiled'}")
    print("| model | total params | active params | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = bench(name, args, device)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['total'] / 1e6:,.1f}M | {r['active'] / 1e6:,.1f}M | {r['tokens_per_s']:,.0f} | "
              f"{mfu} | {r['peak_gib']:.1f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
