"""Benchmark one MoE layer against its peers at matched work, on one GPU (bf16).

For each shape it times forward and forward+backward, reports TFLOP/s of the active FLOPs and peak memory for:
our layer (eager, torch.compile, and eager captured in one CUDA graph), an equal-FLOP dense SwiGLU (the ceiling), a
per-expert loop reference, and DeepSpeed's MoE layer (when deepspeed is importable; at our k and at top-2). Every
row of one shape runs on the same input in one process. The CUDA-graph row doubles as a check that the layer's
dropless path never synchronises with the host: capturing a stream fails on any device-to-host copy.

    python scripts/bench_moe.py [--shapes olmoe,small,mixtral,deepseek,medium] [--out benchmarks/moe.md] [--profile]
                                [--fp8 [--bf16-wgrad]]

`--fp8` adds our layer with its expert GEMMs (and shared expert) in FP8 (`moeformer.layers.fp8.enable_fp8`), eager
and compiled, beside the bf16 rows on the same input, and prints each FP8 row's fwd+bwd speed over its bf16 twin;
`--bf16-wgrad` also adds the compiled FP8 layer with its experts' weight gradients in bf16 (`fp8_wgrad=False`).

Expert parallelism: under torchrun, `--ep N` shards the layer's experts over the N ranks and times it, each rank
with its own tokens at the shape's size, beside the unsharded layer alone on each rank: per-GPU TFLOP/s (the slowest
rank's time) and their ratio, plus the host syncs of one forward+backward. Rows: the all-to-all dispatcher, one per
block count of `--ep-chunks` (1: the all-to-alls overlap only the shared expert and the rank's own rows; more:
each block's transfer also overlaps the other blocks' GEMMs), and the all-gather dispatcher (`--ep-dispatchers`),
on CUDA also captured in one CUDA graph with its NCCL collectives (static shapes, no host sync).
Runs on CPU with gloo too (fp32), e.g. `--shapes tiny` as a smoke test.

    torchrun --nproc_per_node 2 scripts/bench_moe.py --ep 2 --ep-chunks 1,2,4 --shapes olmoe
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeformer.layers.fp8 import enable_fp8
from moeformer.layers.mlp import MLP
from moeformer.layers.moe import MoE, MoEConfig


@dataclass
class Shape:
    name: str
    tokens: int
    dim: int
    ffn: int
    experts: int
    top_k: int
    shared: int = 0  # number of shared experts of width ffn


SHAPES = {
    "olmoe": Shape("olmoe-like", 16384, 2048, 1024, 64, 8),
    "small": Shape("small-moe", 16384, 512, 896, 8, 2),
    "medium": Shape("medium-moe", 16384, 1024, 1536, 16, 2),
    "mixtral": Shape("mixtral-like", 8192, 4096, 14336, 8, 2),
    "deepseek": Shape("deepseek-like", 16384, 2048, 1408, 64, 6, shared=2),
    "tiny": Shape("tiny", 256, 32, 16, 8, 2, shared=1),  # smoke tests (CPU)
}


def active_flops(s: Shape) -> float:
    """Forward FLOPs per layer call: SwiGLU expert math of the k routed (+ shared) experts and the router."""
    experts = 2 * s.tokens * (s.top_k + s.shared) * 3 * s.dim * s.ffn
    return experts + 2 * s.tokens * s.dim * s.experts


class LoopMoE(nn.Module):
    """The common reference style: route, then a Python loop over experts gathering each one's tokens."""

    def __init__(self, layer: MoE) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        routing = self.layer.router(flat, None)
        experts = self.layer.experts
        out = torch.zeros_like(flat, dtype=torch.float32)
        for e in range(experts.num_experts):
            slots = (routing.expert_idx == e).nonzero().squeeze(-1)
            tok = routing.token_idx[slots]
            gate, up = (flat[tok] @ experts.w_in[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ experts.w_out[e]
            out.index_add_(0, tok, y.float() * routing.weights[slots, None])
        shared = self.layer.shared(flat)
        if shared is not None:
            out = out + shared
        return out.to(x.dtype).view(b, t, d)


class DeepSpeedMoE(nn.Module):
    """deepspeed.moe.layer.MoE with SwiGLU experts (capacity factor 1.25, token dropping) at the same shape."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        from moeformer.parallel import init_distributed  # imports DeepSpeed: only for these rows

        init_distributed()  # DeepSpeed's layer needs a process group: a world of one
        self.moe = DSMoE(
            hidden_size=s.dim,
            expert=MLP(s.dim, s.ffn),
            num_experts=s.experts,
            ep_size=1,
            k=s.top_k,
            capacity_factor=1.25,
            eval_capacity_factor=1.25,
            drop_tokens=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[0]


def output_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One training-style call: fresh parameter gradients (no accumulation adds; inside a CUDA graph they live in the
    graph's pool), forward, backward."""
    module.zero_grad(set_to_none=True)
    output_of(module, x).backward(grad)


def time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() measured with CUDA events (wall clock without CUDA)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cuda_graphed(fn):
    """fn captured in a CUDA graph after warm-up on a side stream; returns the replay. Raises if fn syncs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(module: nn.Module, x: torch.Tensor, flops: float, graphed: bool = False) -> dict[str, float]:
    """Forward and forward+backward median time, TFLOP/s (active FLOPs, backward = 2x forward), peak memory."""
    grad = torch.randn_like(x)
    xg = x.detach().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            output_of(module, x)

    def fwd_bwd():
        forward_backward(module, xg, grad)

    if graphed:
        fwd, fwd_bwd = cuda_graphed(fwd), cuda_graphed(fwd_bwd)
    cuda = torch.cuda.is_available()
    f_ms = time_ms(fwd)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    fb_ms = time_ms(fwd_bwd)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return {
        "fwd_ms": f_ms,
        "fwd_tflops": flops / f_ms / 1e9,
        "fwdbwd_ms": fb_ms,
        "fwdbwd_tflops": 3 * flops / fb_ms / 1e9,
        "peak_gib": float("nan") if graphed else peak,  # a graph's memory is its pool, reserved at capture
    }


def layer_config(s: Shape) -> MoEConfig:
    return MoEConfig(
        num_experts=s.experts,
        top_k=s.top_k,
        ffn_dim=s.ffn,
        router="softmax",
        aux_loss_coef=0.01,
        num_shared_experts=s.shared,
        shared_ffn_dim=s.shared * s.ffn if s.shared else None,
    )


def candidates(
    s: Shape, skip: set[str], fp8: bool = False, bf16_wgrad: bool = False
) -> dict[str, tuple[nn.Module, float]]:
    """label -> (module, its active forward FLOPs) for one shape."""
    ours, flops = MoE(s.dim, layer_config(s)), active_flops(s)
    rows = {"moeformer (eager)": (ours, flops)}
    if "compile" not in skip:
        rows["moeformer (compiled)"] = (torch.compile(ours), flops)
    if fp8:
        ours_fp8 = copy.deepcopy(ours).to("cuda", torch.bfloat16)
        enable_fp8(ours_fp8)
        rows[f"{FP8} (eager)"] = (ours_fp8, flops)
        if "compile" not in skip:
            rows[f"{FP8} (compiled)"] = (torch.compile(ours_fp8), flops)
        if bf16_wgrad and "compile" not in skip:
            ours_gw = copy.deepcopy(ours).to("cuda", torch.bfloat16)
            enable_fp8(ours_gw, fp8_wgrad=False)
            rows[f"{FP8} (compiled, bf16 wgrad)"] = (torch.compile(ours_gw), flops)
    if "graph" not in skip:
        rows[GRAPHED] = (ours, flops)
    rows["dense SwiGLU, equal FLOPs"] = (MLP(s.dim, (s.top_k + s.shared) * s.ffn), flops)
    if "loop" not in skip:
        rows["per-expert loop"] = (LoopMoE(ours), flops)
    if "deepspeed" not in skip:
        for k in dict.fromkeys((s.top_k, 2)):  # our k, and top-2 (DeepSpeed's classic gate)
            try:
                ds_shape = Shape(s.name, s.tokens, s.dim, s.ffn, s.experts, k)
                rows[f"DeepSpeed MoE (top-{k}, cap 1.25)"] = (DeepSpeedMoE(ds_shape), active_flops(ds_shape))
            except Exception as e:
                print(f"  DeepSpeed MoE top-{k} unavailable at {s.name}: {type(e).__name__}: {e}")
    return rows


GRAPHED = "moeformer (eager, one CUDA graph)"
GRAPHED_EP = "eager, one CUDA graph"  # the expert-parallel rows' label suffix
FP8 = "moeformer FP8"


def profile(module: nn.Module, x: torch.Tensor, top: int = 15):
    """bench_train's profile of one forward+backward (as timed, after two more): device time by kernel kind (NCCL's
    under expert parallelism, and how much of it overlapped computation), the wall time and the `top` kernels."""
    from bench_train import profile as profile_step  # scripts/ is on sys.path when this file runs as a script

    xg = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)
    for _ in range(2):
        forward_backward(module, xg, grad)
    return profile_step(lambda: forward_backward(module, xg, grad), top)


def expert_parallel(args: argparse.Namespace) -> None:
    """`--ep N` under torchrun: the sharded layer against the unsharded one, per GPU, on every rank's own tokens."""
    import copy

    import torch.distributed as dist

    from moeformer.parallel import ParallelConfig, apply_expert_parallel, init_parallel_groups, shutdown_distributed
    from moeformer.training.metrics import HostSyncs

    groups = init_parallel_groups(ParallelConfig(ep=args.ep))
    rank, cuda = dist.get_rank(), torch.cuda.is_available()
    device, dtype = (
        (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16) if cuda else ("cpu", torch.float32)
    )
    header = (
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} x {dist.get_world_size()}, torch "
        f"{torch.__version__}, date {time.strftime('%Y-%m-%d')}, {dtype}, command: torchrun --nproc_per_node "
        f"{dist.get_world_size()} scripts/bench_moe.py --ep {args.ep} --ep-chunks {args.ep_chunks} --ep-dispatchers "
        f"{args.ep_dispatchers} --shapes {args.shapes}"
    )
    columns = (
        "| shape | layer | fwd ms | fwd TFLOP/s per GPU | fwd+bwd ms | fwd+bwd TFLOP/s per GPU | vs one GPU "
        "(fwd+bwd) | host syncs (fwd+bwd) |"
    )
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|"]
    for key in args.shapes.split(","):
        s = SHAPES[key]
        torch._dynamo.reset()
        torch.manual_seed(0)  # the same weights on every rank
        single = MoE(s.dim, layer_config(s)).to(device, dtype)
        torch.manual_seed(1 + rank)  # each rank its own tokens
        x = torch.randn(1, s.tokens, s.dim, device=device, dtype=dtype)
        rows = {"one GPU, unsharded": single}
        variants = []  # (label, apply_expert_parallel's keyword arguments)
        for name in args.ep_dispatchers.split(","):
            if name == "all_to_all":
                chunks = args.ep_chunks.split(",")
                variants += [(f"all-to-all, {c} block(s)", {"chunks": int(c), "dispatcher": name}) for c in chunks]
            else:
                variants.append((name.replace("_", "-"), {"dispatcher": name}))
        for label, kwargs in variants:
            sharded = copy.deepcopy(single)
            apply_expert_parallel(sharded, groups, **kwargs)
            rows[f"ep={args.ep}, {label} (eager)"] = sharded
            if "compile" not in args.skip.split(","):
                rows[f"ep={args.ep}, {label} (compiled)"] = torch.compile(sharded)
            if kwargs.get("dispatcher") == "all_gather" and cuda and "graph" not in args.skip.split(","):
                rows[f"ep={args.ep}, {label} ({GRAPHED_EP})"] = sharded  # static shapes, no host sync: capturable
        base = None
        for label, module in rows.items():
            graphed = label.endswith(f"({GRAPHED_EP})")
            try:
                r = measure(module, x, active_flops(s), graphed=graphed)
            except RuntimeError as e:
                if not graphed:
                    raise
                # a capture that fails fails on every rank alike: the reason, and the other rows go on
                lines.append(f"| {s.name} | {label} | capture failed: {str(e).splitlines()[0][:120]} | | | | | |")
                continue
            slowest = torch.tensor([r["fwd_ms"], r["fwdbwd_ms"]], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            f_ms, fb_ms = slowest.tolist()
            xg, grad = x.detach().requires_grad_(True), torch.randn_like(x)
            with HostSyncs() as syncs:
                forward_backward(module, xg, grad)
            if args.profile and cuda and "compiled" not in label:  # every rank joins the collectives
                table = profile(module, x)
                if rank == 0:
                    print(f"{s.name}, {label}, rank 0: top kernels of one forward+backward\n{table}", flush=True)
            tflops = 3 * active_flops(s) / fb_ms / 1e9
            base = base or tflops
            lines.append(
                f"| {s.name} (T={s.tokens} per GPU, d={s.dim}, f={s.ffn}, E={s.experts}, k={s.top_k}"
                f"{f', shared={s.shared}' if s.shared else ''}) | {label} | {f_ms:.2f} | "
                f"{active_flops(s) / f_ms / 1e9:.1f} | {fb_ms:.2f} | {tflops:.1f} | {tflops / base:.2f} | "
                f"{syncs.count} |"
            )
    if rank == 0:
        print("\n".join(lines), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="olmoe,small,mixtral,deepseek")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (run under torchrun)")
    parser.add_argument(
        "--ep-chunks", default="1,2,4", help="with --ep: the blocks the all-to-alls are split in (one row each)"
    )
    parser.add_argument(
        "--ep-dispatchers", default="all_to_all,all_gather", help="with --ep: the expert-parallel dispatchers timed"
    )
    parser.add_argument("--skip", default="", help="comma list of: compile, graph, loop, deepspeed")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the top CUDA kernels of our layer (with --ep: each eager row, and the NCCL time overlapped)",
    )
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--fp8", action="store_true", help="also time our layer with FP8 expert GEMMs")
    parser.add_argument("--bf16-wgrad", action="store_true", help="with --fp8: also FP8 with bf16 weight gradients")
    args = parser.parse_args()
    if args.ep > 1:
        return expert_parallel(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs a CUDA device")
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    header = (
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}, bf16, command: python scripts/bench_moe.py --shapes {args.shapes}"
        + (" --fp8" if args.fp8 else "")
        + (" --bf16-wgrad" if args.bf16_wgrad else "")
    )
    lines = [
        header,
        "",
        "| shape | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
        "vs dense (fwd+bwd) | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []  # FP8 over bf16, below the table
    for key in args.shapes.split(","):
        s = SHAPES[key]
        torch._dynamo.reset()  # fresh compile caches per shape: the layer's code would pass the recompile limit
        x = torch.randn(1, s.tokens, s.dim, device="cuda", dtype=torch.bfloat16)
        results = {}
        for label, (module, flops) in candidates(s, skip, args.fp8, args.bf16_wgrad).items():
            module = module.to("cuda", torch.bfloat16)
            if args.profile and label in ("moeformer (eager)", "moeformer (compiled)"):
                print(f"{s.name}, {label}: top kernels of one forward+backward\n{profile(module, x)}", flush=True)
            try:
                results[label] = measure(module, x, flops, graphed=label == GRAPHED)
            except Exception as e:
                print(f"  {label} failed at {s.name}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        dense = results.get("dense SwiGLU, equal FLOPs")
        for label, r in results.items():
            ratio = r["fwdbwd_tflops"] / dense["fwdbwd_tflops"] if dense else float("nan")
            lines.append(
                f"| {s.name} (T={s.tokens}, d={s.dim}, f={s.ffn}, E={s.experts}, k={s.top_k}"
                f"{f', shared={s.shared}' if s.shared else ''}) | {label} | {r['fwd_ms']:.2f} | "
                f"{r['fwd_tflops']:.0f} | "
                f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops']:.0f} | {ratio:.2f} | {r['peak_gib']:.2f} |"
            )
        print("\n".join(lines[-len(results) :]), flush=True)
        for mode in ("eager", "compiled", "compiled, bf16 wgrad"):
            fp8, bf16 = results.get(f"{FP8} ({mode})"), results.get(f"moeformer ({mode.split(',')[0]})")
            if fp8 and bf16:
                ratio = fp8["fwdbwd_tflops"] / bf16["fwdbwd_tflops"]
                notes.append(f"{s.name}: FP8 / bf16 fwd+bwd, {mode}: {ratio:.2f}x")
                print(notes[-1], flush=True)
    table = "\n".join(lines + ([""] + notes if notes else []))
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if torch.distributed.is_initialized():  # DeepSpeed's rows joined a world of one
        from moeformer.parallel import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    main()
