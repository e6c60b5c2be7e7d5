"""Host time of one row collective: how long the launching thread spends per call (the device work queued, not
waited for) and the wall time per call with the device drained, for the ways a layer can issue it:

    torchrun --nproc_per_node 2 scripts/bench_collectives.py [--rows 1,16384] [--dim 1024] [--calls 200]

- functional all-gather + wait (torch.distributed._functional_collectives: what torch.compile traces natively);
- c10d `all_gather_into_tensor`;
- moeformer's `all_gather_rows` (parallel/comm.py: c10d, a custom op under torch.compile), eager;
- compiled all-gather -> x2 -> reduce-scatter, with functional collectives and with moeformer's.

A layer whose collectives cost more host time than its kernels take on the device leaves the device idle (the
expert-parallel all-gather dispatcher: six collectives per forward+backward). NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moeformer.parallel.comm import all_gather_rows, reduce_scatter_rows


def per_call_us(fn, x: torch.Tensor, calls: int, sync) -> tuple[float, float]:
    """(host us, wall us) per call of fn(x), after 10 warm-up calls."""
    for _ in range(10):
        fn(x)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn(x)
    host = time.perf_counter() - start
    sync()
    wall = time.perf_counter() - start
    return 1e6 * host / calls, 1e6 * wall / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16384", help="comma list of row counts per rank")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32

    def c10d_all_gather(x):
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    def functional_all_gather(x):
        return funcol.wait_tensor(funcol.all_gather_tensor(x, 0, group))

    def functional_round_trip(x):
        return funcol.wait_tensor(funcol.reduce_scatter_tensor(functional_all_gather(x) * 2, "sum", 0, group))

    ways = {
        "functional all-gather + wait": functional_all_gather,
        "c10d all_gather_into_tensor": c10d_all_gather,
        "moeformer all_gather_rows (eager)": lambda x: all_gather_rows(x, group),
        "compiled all-gather, x2, reduce-scatter (functional)": torch.compile(functional_round_trip),
        "compiled all-gather, x2, reduce-scatter (moeformer)": torch.compile(
            lambda x: reduce_scatter_rows(all_gather_rows(x, group) * 2, group)
        ),
    }
    lines = [
        f"{torch.cuda.get_device_name() if cuda else 'CPU'} x {dist.get_world_size()}, torch {torch.__version__}, "
        f"{dist.get_backend()}, {dtype}, {args.calls} calls",
        "",
        "| call | rows per rank | host us per call | wall us per call |",
        "|---|---|---|---|",
    ]
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.dim, device=device, dtype=dtype)
        for name, fn in ways.items():
            host, wall = per_call_us(fn, x, args.calls, sync)
            lines.append(f"| {name} | {rows} | {host:.1f} | {wall:.1f} |")
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
