"""Training throughput of zoo models on one device: tokens/s and MFU for a fixed number of steps.

    python scripts/bench_train.py [--models medium-moe,medium-dense] [--seq-len 4096] [--batch 16] [--steps 20]
                                  [--compile-mode reduce-overhead] [--set n_heads=8 ...] [--profile] [--fp8]
                                  [--bf16-wgrad]

bf16 weights, fused AdamW, `torch.compile` of each transformer block and the LM head (unless --no-compile;
`--compile-scope model` compiles the whole model as one graph; `--compile-mode reduce-overhead` also replays the
compiled forward and backward as CUDA graphs), the `auto` attention backend, random token ids (throughput does not
depend on the text). MFU counts active parameters only (moeformer.training.metrics). The graph-break count is
dynamo's, over the compiled warm-up steps (forward and backward of the whole model). `--fp8` trains the linears and
expert GEMMs in FP8 (`moeformer.layers.fp8.enable_fp8`, applied before compiling, as the trainer does; with
`--bf16-wgrad` the experts' weight gradients stay bf16, as train.fp8_wgrad=false). Step ms and
optimizer step ms (one untimed step, device synchronised) are the columns scripts/bench_layouts.py reports for the
trainer: with the same --seq-len and --batch as a run config's seq_len and micro_batch_size, the difference between
the two is the trainer's own (DeepSpeed's bf16 master weights and ZeRO partitions, data, per-step metrics).
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass

import torch
import yaml
from torch._dynamo.utils import counters

from moeformer import ModelConfig, build_model, compile_blocks, count_params
from moeformer.layers.fp8 import enable_fp8
from moeformer.training.metrics import flops_per_token, peak_flops


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Wall-clock throughput over `steps` timed steps after `warmup` untimed ones (compilation, allocator)."""
    overrides = dict(args.set)
    overrides["max_seq_len"] = max(args.seq_len, ModelConfig.from_name(name, **overrides).max_seq_len)
    config = ModelConfig.from_name(name, **overrides)
    model = build_model(config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    if args.fp8:
        print(f"{name}: {enable_fp8(model, fp8_wgrad=not args.bf16_wgrad).summary()}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = model
    if not args.no_compile and args.compile_scope == "model":
        step_fn = torch.compile(model, mode=args.compile_mode)
    elif not args.no_compile:  # as moeformer.training compiles
        compile_blocks(model, mode=args.compile_mode)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(optimizer_seconds: list[float] | None = None) -> None:
        """One training step; with `optimizer_seconds`, appends the optimizer step's time (device synchronised)."""
        loss = step_fn(ids, labels=ids, return_logits=False).loss
        loss.backward()
        if optimizer_seconds is not None:
            sync()
            start = time.perf_counter()
        opt.step()
        if optimizer_seconds is not None:
            sync()
            optimizer_seconds.append(time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()

    counters["graph_break"].clear()
    for _ in range(args.warmup):
        step()
    breaks = None if args.no_compile else dict(counters["graph_break"])  # compiling happens in the warm-up
    optimizer_seconds: list[float] = []
    step(optimizer_seconds)  # untimed: its synchronisations would slow the timed steps
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    if args.profile and device.type == "cuda":
        print(f"{name}: device time of one training step by kernel kind\n{profile(step)}", flush=True)
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
        "graph_breaks": breaks,
        "step_ms": 1e3 * seconds / args.steps,
        "optimizer_ms": 1e3 * optimizer_seconds[0],
    }


KERNEL_KINDS = {  # substrings of CUDA kernel names, first match wins
    "communication (NCCL)": ("nccl",),
    "attention": ("cudnn", "flash", "fmha", "attention"),
    "gemm": ("gemm", "cutlass", "nvjet", "xmma", "cublas"),
    "triton (fused elementwise, norms, loss)": ("triton",),
    "optimizer": ("adam", "multi_tensor"),
}


@dataclass
class StepProfile:
    """One profiled step: the printed report, the wall time and the NCCL kernel time by collective (kernel names:
    AllReduce, AllGather, ReduceScatter, SendRecv: the all-to-all and the pipeline's point-to-point)."""

    text: str
    wall_ms: float
    collectives_ms: dict[str, float]

    def __str__(self) -> str:
        return self.text


def profile(step, top: int = 25, trace: str | None = None) -> StepProfile:
    """Device time of one `step` grouped by kernel kind; its wall time, the time kernels ran side by side (NCCL's
    stream beside compute) and the time no kernel ran (the device waiting for the host); then its `top` kernels
    (torch.profiler). `trace`: also record the host (Python stacks) and write a Chrome trace there (.json.gz)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with torch_profile(activities=activities, with_stack=bool(trace)) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    if trace:
        prof.export_chrome_trace(trace)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds: dict[str, float] = {}
    collectives: dict[str, float] = {}
    for e in kernels:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        kind = next((k for k, keys in KERNEL_KINDS.items() if any(w in e.name.lower() for w in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        if collective := re.match(r"nccl(?:Dev)?Kernel_([A-Za-z]+)", e.name):
            collectives[collective[1]] = collectives.get(collective[1], 0.0) + ms
    total = sum(kinds.values())
    busy_ms, span_ms = device_busy(kernels)
    lines = [
        f"  {kind:42s} {ms:8.2f} ms  {100 * ms / total:5.1f}%"
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])
    ]
    lines += [f"    NCCL {name:37s} {ms:8.2f} ms" for name, ms in sorted(collectives.items(), key=lambda kv: -kv[1])]
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=top, max_name_column_width=70)
    totals = [
        f"  {'total':42s} {total:8.2f} ms",
        f"  {'wall (profiled)':42s} {wall_ms:8.2f} ms",
        f"  {'overlapped (kernels side by side)':42s} {total - busy_ms:8.2f} ms",
        f"  {'device idle (first to last kernel)':42s} {span_ms - busy_ms:8.2f} ms",
    ]
    return StepProfile("\n".join(lines + totals + [table]), wall_ms, collectives)


def device_busy(kernels) -> tuple[float, float]:
    """(ms during which at least one kernel ran, ms from the first kernel's start to the last one's end) of the
    profiler's device events."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / 1e3, (end - spans[0][0]) / 1e3 if spans else 0.0


def model_override(text: str) -> tuple[str, object]:
    """ "n_heads=8" -> ("n_heads", 8): the value parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="medium-moe,medium-dense")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)  # 64k tokens per step at seq 4096
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    parser.add_argument(
        "--compile-scope",
        default="blocks",
        choices=["blocks", "model"],
        help="one graph per transformer block and the LM head (as the trainer compiles), or one for the whole model",
    )
    parser.add_argument("--profile", action="store_true", help="print where one step's device time goes")
    parser.add_argument("--fp8", action="store_true", help="linears and expert GEMMs in FP8 (GPU of cc >= 8.9)")
    parser.add_argument("--bf16-wgrad", action="store_true", help="with --fp8: the experts' weight gradients in bf16")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=model_override,
        metavar="KEY=VALUE",
        help="override a model config field of every model (repeatable), e.g. --set n_heads=8",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}, seq {args.seq_len}, batch {args.batch}, steps {args.steps}, "
        f"{'eager' if args.no_compile else f'compiled ({args.compile_mode})'}{', fp8' if args.fp8 else ''}"
        + (" (bf16 wgrad)" if args.bf16_wgrad else "")
        + "".join(f", {k}={v}" for k, v in args.set)
    )
    print(
        "| model | total params | active params | tokens/s | MFU | peak GiB | graph breaks | step ms | "
        "optimizer step ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name in args.models.split(","):
        r = bench(name, args, device)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        breaks = "n/a" if r["graph_breaks"] is None else sum(r["graph_breaks"].values())
        print(
            f"| {r['model']} | {r['total'] / 1e6:,.1f}M | {r['active'] / 1e6:,.1f}M | {r['tokens_per_s']:,.0f} | "
            f"{mfu} | {r['peak_gib']:.1f} | {breaks} | {r['step_ms']:.1f} | {r['optimizer_ms']:.1f} |",
            flush=True,
        )
        for reason, count in (r["graph_breaks"] or {}).items():
            print(f"  graph break x{count}: {reason}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
