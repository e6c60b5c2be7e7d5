"""Serving throughput and latency of the continuous-batching `Engine` beside static batching, on a random-weight zoo
model.

The load: `--requests` requests arriving as a Poisson process (`--rate` per second), prompts uniform in
[--prompt-min, --prompt-max] tokens, `--shared` of them starting with one shared `--shared-len`-token system prompt,
output lengths log-uniform in [--out-min, --out-max] (a long tail, as real chat traffic), greedy, no eos (every
request runs to its max_tokens). Rows of the table:

- engine: the requests fed to the engine as they arrive, at most `--concurrency` running; output tokens/s over the
  run, time to first token (TTFT, from arrival) and inter-token latency (ITL) p50/p99, from the host times at which
  `step` returned each token (a step ends with a host read of its tokens, so these are device-complete times);
- static batching: the same requests in arrival order in batches of `--concurrency`, each batch one left-padded
  `model.generate(compile=True)` call (CUDA graph per token on a GPU) running until its longest request's max_tokens,
  all requests available at once (no arrival waits: favourable to it); tokens/s counts each request's own tokens;
- single request: `model.generate(compile=True)` decode tokens/s of one request (first token excluded), and the
  engine's with one request;
- prefix hit vs miss: TTFT of a request behind a `--system-len`-token system prompt seen for the first time (miss)
  and again with another question (hit), alone in the engine, median of `--prefix-trials`.

Everything is warmed first (compiles, CUDA graphs: the engine's `warmup`, a full untimed static pass).

Under torchrun with --tp / --ep the model is split with `moeformer.parallel` (one GPU per rank) and served by a
multi-rank engine: rank 0 runs the load and prints, the other ranks follow; the static and single-request
`generate` rows are left out there.

    python scripts/bench_serve.py --model olmoe-1b-7b --dtype bf16 [--concurrency 64] [--requests 512] [--rate 64]
    torchrun --nproc_per_node 2 scripts/bench_serve.py --model deepseek-v3 --layers 8 --ep 2 --skip-static
    python scripts/bench_serve.py --model tiny-moe --device cpu --dtype fp32 --no-compile --requests 24 \
        --concurrency 8 --rate 0 --prompt-max 64 --out-max 32 --shared-len 32 --system-len 256 --prefix-trials 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import sys
import time

import torch

from moeformer.models import ModelConfig, build_model
from moeformer.models.checkpoint import DTYPE_NAMES
from moeformer.models.generation import StepTimer
from moeformer.serving import Engine, SamplingParams


def workload(args, vocab: int) -> list[tuple[float, list[int], int]]:
    """(arrival second, prompt ids, max_tokens) per request, in arrival order."""
    rng = random.Random(args.seed)
    system = [rng.randrange(vocab) for _ in range(args.shared_len)]
    t, out = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
        if rng.random() < args.shared:
            prompt = system + prompt
        new = int(math.exp(rng.uniform(math.log(args.out_min), math.log(args.out_max))))
        out.append((t, prompt, new))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def run_engine(engine: Engine, requests) -> dict:
    """Feed `requests` at their arrival times; tokens/s, TTFT and ITL percentiles (seconds), and tokens/s over the
    steps that began with a full batch (max_batch requests running: the steady state of a saturated engine, without
    the ramp-up and the drain into a finite run's long tail)."""
    arrival, last, ttft, itl = {}, {}, [], []
    tokens, pending, start = 0, list(enumerate(requests)), time.perf_counter()
    full, steps = dict(steps=0, tokens=0, seconds=0.0), 0
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, (t, prompt, new) = pending.pop(0)
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=new))
            arrival[str(i)] = start + t
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, pending[0][1][0] - now)))
            continue
        saturated, began = len(engine.scheduler.running) == engine.max_batch, time.perf_counter()
        outputs = engine.step()
        done, steps = time.perf_counter(), steps + 1
        if saturated:
            full["steps"] += 1
            full["seconds"] += done - began
            full["tokens"] += sum(len(out.new_token_ids) for out in outputs)
        for out in outputs:
            if out.new_token_ids:
                tokens += len(out.new_token_ids)
                if out.request_id in last:
                    itl.append(done - last[out.request_id])
                else:
                    ttft.append(done - arrival[out.request_id])
                last[out.request_id] = done
    elapsed = time.perf_counter() - start
    full_tps = full["tokens"] / full["seconds"] if full["steps"] else float("nan")
    return dict(
        tps=tokens / elapsed,
        ttft=ttft,
        itl=itl,
        seconds=elapsed,
        tokens=tokens,
        steps=steps,
        full=full,
        full_tps=full_tps,
    )


@torch.no_grad()
def run_static(model, requests, concurrency: int, device, compile: bool) -> dict:
    """Batches of `concurrency` in arrival order, each one left-padded compiled generate; useful tokens/s."""
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(requests), concurrency):
        batch = requests[first : first + concurrency]
        width = max(len(p) for _, p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            ids.to(device),
            max(n for _, _, n in batch),
            temperature=0.0,
            attention_mask=mask.to(device),
            compile=compile,
        )
        out[0, -1].item()  # wait for the device
        tokens += sum(n for _, _, n in batch)
    elapsed = time.perf_counter() - start
    return dict(tps=tokens / elapsed, seconds=elapsed, tokens=tokens)


@torch.no_grad()
def single_decode_tps(model, vocab: int, prompt_len: int, new: int, device, compile: bool) -> float:
    ids = torch.randint(0, vocab, (1, prompt_len), device=device)
    model.generate(ids, new, temperature=0.0, compile=compile)  # warm
    timer = StepTimer(device)
    model.generate(ids, new, temperature=0.0, compile=compile, stream=timer)
    return (timer.steps - 1) / timer.seconds()[1]


def engine_single_tps(engine: Engine, vocab: int, prompt_len: int, new: int) -> float:
    engine.add_request("single", [1] * prompt_len, SamplingParams(max_tokens=new))
    engine.step()  # prefill + first token
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def prefix_ttft(engine: Engine, vocab: int, system_len: int, trials: int, seed: int) -> tuple[float, float]:
    """Median TTFT (seconds) of a miss (new system prompt) and a hit (the same one again, another question)."""
    rng = random.Random(seed + 1)
    miss, hit = [], []
    for trial in range(trials):
        system = [rng.randrange(vocab) for _ in range(system_len)]
        for name, times in (("miss", miss), ("hit", hit)):
            question = [rng.randrange(vocab) for _ in range(32)]
            start = time.perf_counter()
            engine.add_request(f"{name}{trial}", system + question, SamplingParams(max_tokens=1))
            while engine.has_unfinished():
                engine.step()
            times.append(time.perf_counter() - start)
    return statistics.median(miss), statistics.median(hit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="olmoe-1b-7b", help="zoo model name (random weights)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=int, default=64, help="engine max_batch and static batch size")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--rate", type=float, default=64.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=512)
    parser.add_argument("--out-min", type=int, default=16)
    parser.add_argument("--out-max", type=int, default=1024)
    parser.add_argument("--shared", type=float, default=0.5, help="share of requests behind the shared system prompt")
    parser.add_argument("--shared-len", type=int, default=256)
    parser.add_argument("--system-len", type=int, default=2048, help="system prompt of the prefix hit/miss TTFT")
    parser.add_argument("--prefix-trials", type=int, default=5)
    parser.add_argument("--single-new", type=int, default=256, help="new tokens of the single-request rows")
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument(
        "--step-tokens", type=int, default=None, help="rows of the compiled step (default 4 x concurrency)"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_seq_len")
    parser.add_argument("--no-compile", action="store_true", help="everything eager (a quick CPU run)")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="override the model's depth (a shallower copy)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (under torchrun)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel ranks (under torchrun)")
    args = parser.parse_args()

    config = ModelConfig.from_name(args.model)
    if args.layers is not None:
        config = dataclasses.replace(config, n_layers=args.layers)
    group, rank = None, 0
    if args.tp > 1 or args.ep > 1:
        import torch.distributed as dist

        from moeformer.parallel import ParallelConfig, init_distributed, parallelize

        init_distributed()
        rank = dist.get_rank()
        if torch.cuda.is_available():
            args.device = f"cuda:{torch.cuda.current_device()}"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.tp > 1 or args.ep > 1:  # each rank allocates only its shard, so a model larger than one GPU fits
        model = build_model(config, device="meta").to(DTYPE_NAMES[args.dtype])
        model, _ = parallelize(model, ParallelConfig(tp=args.tp, ep=args.ep))
        model.to_empty(device=device).eval()
        model.init_weights()  # the same draws in the same order on every rank: replicated weights agree
        group = dist.new_group(backend="gloo")
        args.skip_static = True
    else:
        model = build_model(config, device=device, dtype=DTYPE_NAMES[args.dtype]).eval()
    vocab = model.config.vocab_size
    requests = workload(args, vocab)
    engine = Engine(
        model,
        max_batch=args.concurrency,
        block_size=args.block_size,
        prefill_chunk=args.prefill_chunk,
        step_tokens=args.step_tokens,
        max_model_len=args.max_model_len,
        compile=not args.no_compile,
        group=group,
    )
    if rank != 0:
        engine.follow()
    else:
        try:
            report(args, model, engine, requests, device)
        finally:
            engine.close()
    if group is not None:
        from moeformer.parallel import shutdown_distributed

        shutdown_distributed()


def report(args, model, engine: Engine, requests, device) -> None:
    """Warm up, run every measurement, print the table (rank 0)."""
    vocab = model.config.vocab_size
    print(
        f"model {args.model} ({args.dtype}, random weights) on {device}"
        f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, torch {torch.__version__}; "
        f"{engine.num_blocks} cache blocks of {args.block_size}; command: python scripts/bench_serve.py "
        f"{' '.join(sys.argv[1:])}",
        flush=True,
    )
    start = time.perf_counter()
    engine.warmup()
    run_engine(engine, requests[: 2 * args.concurrency])  # prefill shapes, prefix cache paths
    print(f"engine warm-up {time.perf_counter() - start:.0f} s", flush=True)

    served = run_engine(engine, requests)
    rows = [("engine (continuous batching)", served["tps"], served["ttft"], served["itl"])]
    full = served["full"]
    rows.append(
        (
            f"engine, steps begun at a full batch ({full['steps']} of {served['steps']} steps)",
            served["full_tps"],
            [],
            [],
        )
    )
    if not args.skip_static:
        compile = not args.no_compile
        run_static(model, requests, args.concurrency, device, compile)  # compiles every batch's shapes
        static = run_static(model, requests, args.concurrency, device, compile)
        rows.append((f"static batching ({'compiled' if compile else 'eager'} generate)", static["tps"], [], []))
    single = None
    if engine.group is None:
        single = single_decode_tps(model, vocab, 128, args.single_new, device, not args.no_compile)
    engine_single = engine_single_tps(engine, vocab, 128, args.single_new)
    miss, hit = prefix_ttft(engine, vocab, args.system_len, args.prefix_trials, args.seed)

    ms = lambda values, q: f"{percentile(values, q) * 1e3:.1f}" if values else "-"  # noqa: E731
    arrivals = f"Poisson {args.rate}/s" if args.rate > 0 else "all at once"
    print(
        f"\n{len(requests)} requests, {arrivals}, prompts {args.prompt_min}-{args.prompt_max} "
        f"(+{args.shared_len} shared for {args.shared:.0%}), outputs log-uniform {args.out_min}-{args.out_max}, "
        f"concurrency {args.concurrency}\n"
    )
    print("| run | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, tps, ttft, itl in rows:
        print(f"| {name} | {tps:,.0f} | {ms(ttft, 50)} | {ms(ttft, 99)} | {ms(itl, 50)} | {ms(itl, 99)} |")
    if single is not None:
        print(f"| single request, {'eager' if args.no_compile else 'compiled'} generate | {single:,.0f} | | | | |")
    print(f"| single request, engine | {engine_single:,.0f} | | | | |")
    if single is not None:
        print(
            f"\nengine / single-request generate: {served['tps'] / single:.1f}x"
            + (f"; engine / static batching: {served['tps'] / static['tps']:.2f}x" if not args.skip_static else "")
        )
    print(
        f"prefix cache, {args.system_len}-token system prompt: TTFT miss {miss * 1e3:.1f} ms, hit {hit * 1e3:.1f} "
        f"ms ({miss / hit:.1f}x); engine stats {engine.stats()}"
    )


if __name__ == "__main__":
    main()
