"""Generation speed on one GPU against its peers and the memory-bandwidth roofline.

For each model shape (random weights, bf16) it measures greedy decode tokens/s at several batch sizes and prefill
tokens/s of a long prompt, for our model in bf16 / int8 / int4 weights, eager and compiled (static cache, CUDA
graph), and for transformers' `generate` on the same weights (exported with `save_pretrained(format="hf")` and
loaded by transformers), eager and with its static cache + torch.compile. Every row of a shape runs in one process
(the transformers rows in one child process, so a failing compile cannot take the others down) on one machine.

Decode time is read from CUDA events recorded at each streamed token (after the first), so prefill and start-up are
excluded the same way for every implementation; prefill time is from the call to the first token. The roofline
divides the device-to-device copy bandwidth measured in the same run (bytes read + written) by the bytes a decode
step must read: every non-expert weight, the experts a batch of that size selects (expected count for uniform
routing, E * (1 - (1 - k / E) ** B) per layer), the embedding rows and the filled part of the KV cache.

    python scripts/bench_generate.py [--models olmoe,mixtral] [--mixtral-layers 8] [--batches 1,8,64]
        [--weights bf16,int8,int4] [--modes eager,compiled] [--peers eager,static] [--prompt 128] [--new 64]
        [--prefill 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moeformer
from moeformer.models import ModelConfig, build_model
from moeformer.models.generation import StepTimer

MODELS = {"olmoe": ("olmoe-1b-7b", {}), "mixtral": ("mixtral-8x7b", {})}
WEIGHTS = ("bf16", "int8", "int4")
INT4_GROUP = 128


@dataclass
class Row:
    model: str
    weights: str
    impl: str
    batch: int
    decode_tps: float | None = None  # tokens/s over the whole batch
    prefill_tps: float | None = None
    roofline_tps: float | None = None
    weight_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- measuring ---------------------------------------------------------------------------------------------------
def copy_bandwidth(gib: float = 4.0, iters: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written (median of `iters`)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 2 / sorted(times)[len(times) // 2]


def rates(timer: StepTimer, batch: int, prompt_len: int) -> tuple[float, float]:
    """(decode tokens/s after the first token, prefill tokens/s up to the first token) of one timed generation."""
    first, decode = timer.seconds()
    return batch * (timer.steps - 1) / decode, batch * prompt_len / first


def random_prompt(batch: int, length: int, vocab: int, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def ours_rates(model, batch: int, prompt_len: int, new: int, compile: bool) -> tuple[float, float, float]:
    """Decode and prefill tokens/s of `model.generate` (greedy), after one warm-up call of the same shape (whose
    seconds, compilation and capture included, come third); on the model's device."""
    device = model.tok_embeddings.weight.device
    ids = random_prompt(batch, prompt_len, model.config.vocab_size, device=device)
    start = time.perf_counter()
    model.generate(ids, new, temperature=0, compile=compile)  # compile, capture, allocate
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    timer = StepTimer(device)
    model.generate(ids, new, temperature=0, compile=compile, stream=timer)
    return (*rates(timer, batch, prompt_len), warm)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of persistent weights: all, routed experts, and the input embedding table."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    experts = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if ".experts." in n)
    embedding = model.tok_embeddings.weight
    tied = model.config.tie_embeddings
    embedding_bytes = 0 if tied else embedding.numel() * embedding.element_size()
    return {"total": total, "experts": experts, "embedding": embedding_bytes}


def roofline(config: ModelConfig, sizes: dict[str, int], batch: int, context: int, bandwidth: float) -> float:
    """Tokens/s if a decode step only had to read what it needs once, at the measured copy bandwidth."""
    moe = config.moe
    selected = 1.0 if moe is None else 1 - (1 - moe.top_k / moe.num_experts) ** batch
    row = sizes["embedding"] // config.vocab_size
    kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2  # bf16 keys and values
    step = (
        sizes["total"]
        - sizes["experts"]
        - sizes["embedding"]
        + sizes["experts"] * selected
        + batch * row
        + batch * context * kv_per_token
    )
    return batch * bandwidth / step


# ---- transformers peer (child process) ---------------------------------------------------------------------------
def hf_worker(args: argparse.Namespace) -> None:
    """Print one JSON line per measured transformers row; run in a child process."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.hf_worker, dtype=torch.bfloat16, device_map="cuda"
    ).eval()
    vocab = model.config.vocab_size
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0

    class Streamer:  # transformers' streamer protocol: put(prompt), then put(token) per step, end()
        def __init__(self) -> None:
            self.timer, self.seen_prompt = StepTimer("cuda"), False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.timer()
            self.seen_prompt = True

        def end(self) -> None:
            pass

    def hf_rates(batch: int, prompt_len: int, new: int, **kwargs) -> tuple[float, float]:
        ids = random_prompt(batch, prompt_len, vocab)
        options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad, **kwargs)
        with torch.no_grad():
            model.generate(ids, **options)
            streamer = Streamer()
            model.generate(ids, streamer=streamer, **options)
        return rates(streamer.timer, batch, prompt_len)

    variants = {"eager": {}, "static": {"cache_implementation": "static"}}
    for peer in args.peers.split(","):
        if peer == "static":
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                decode, _ = hf_rates(batch, args.prompt, args.new_hf, **variants[peer])
                prefill = hf_rates(1, args.prefill, 2, **variants[peer])[1] if batch == 1 and args.prefill else None
                print(json.dumps({"peer": peer, "batch": batch, "decode": decode, "prefill": prefill}), flush=True)
            except Exception as e:  # report the peer's error as its row
                message = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                print(json.dumps({"peer": peer, "batch": batch, "error": message}), flush=True)
                break


def hf_rows(name: str, directory: Path, args: argparse.Namespace, weight_gib: float, limit) -> list[Row]:
    command = [
        sys.executable,
        __file__,
        "--hf-worker",
        str(directory),
        "--batches",
        args.batches,
        "--prompt",
        str(args.prompt),
        "--new-hf",
        str(args.new_hf),
        "--prefill",
        str(args.prefill),
        "--peers",
        args.peers,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.hf_timeout)
        out = done.stdout
        if done.returncode:
            print(f"transformers worker exited with {done.returncode}:\n{done.stderr[-2000:]}", flush=True)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += "\n" + json.dumps({"peer": "static", "batch": 0, "error": f"timed out after {args.hf_timeout} s"})
    rows = []
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        impl = {
            "eager": "transformers generate (eager)",
            "static": "transformers generate (static cache + torch.compile)",
        }[r["peer"]]
        rows.append(
            Row(
                name,
                "bf16",
                impl,
                r["batch"],
                r.get("decode"),
                r.get("prefill"),
                limit(r["batch"]),
                weight_gib,
                note=r.get("error", ""),
            )
        )
        print(format_row(rows[-1]), flush=True)
    return rows


# ---- driver ------------------------------------------------------------------------------------------------------
def build(config: ModelConfig, weights: str):
    torch.manual_seed(0)  # the same random weights for every variant of a shape
    model = build_model(config, device="cuda", dtype=torch.bfloat16).eval()
    if weights != "bf16":
        moeformer.quantize(model, weights, group_size=INT4_GROUP)
    return model


def bench_shape(key: str, args: argparse.Namespace, bandwidth: float) -> list[Row]:
    zoo, overrides = MODELS[key]
    if key == "mixtral":
        overrides = {**overrides, "n_layers": args.mixtral_layers}
    config = ModelConfig.from_name(zoo, **overrides)
    label = f"{zoo}-shaped" + (f" ({config.n_layers} layers)" if key == "mixtral" else "")
    batches = [int(b) for b in args.batches.split(",")]
    context = args.prompt + args.new // 2
    rows: list[Row] = []
    for weights in args.weights.split(","):
        model = build(config, weights)
        sizes = weight_bytes(model)
        gib = sizes["total"] / 2**30
        if weights == "bf16" and args.peers:
            directory = Path(tempfile.mkdtemp(prefix="bench-hf-", dir=args.tmp))
            try:
                model.save_pretrained(directory / "model", format="hf")
                rows += hf_rows(
                    label,
                    directory / "model",
                    args,
                    gib,
                    lambda b, sizes=sizes: roofline(config, sizes, b, context, bandwidth),
                )
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        for mode in args.modes.split(","):
            compiled = mode == "compiled"
            impl = f"moeformer ({'compiled, CUDA graph' if compiled else 'eager'})"
            for batch in batches:
                new = args.new if compiled else args.new_eager
                row = Row(
                    label,
                    weights,
                    impl,
                    batch,
                    weight_gib=gib,
                    roofline_tps=roofline(config, sizes, batch, context, bandwidth),
                )
                try:
                    row.decode_tps, _, warm = ours_rates(model, batch, args.prompt, new, compiled)
                    row.note = f"warm-up call {warm:.0f} s"
                    if batch == 1 and args.prefill:
                        row.prefill_tps = ours_rates(model, 1, args.prefill, 2, compiled)[1]
                except Exception as e:
                    row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                rows.append(row)
                print(format_row(row), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def fmt(x: float | None, digits: int = 0) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def format_row(r: Row) -> str:
    ratio = f"{r.decode_tps / r.roofline_tps:.1%}" if r.decode_tps and r.roofline_tps else ""
    ms = f"{1e3 * r.batch / r.decode_tps:.2f}" if r.decode_tps else ""
    return (
        f"| {r.model} | {r.weights} | {r.impl} | {r.batch} | {fmt(r.decode_tps)} | {ms} | {fmt(r.roofline_tps)} "
        f"| {ratio} | {fmt(r.prefill_tps)} | {fmt(r.weight_gib, 2)} | {r.note} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="olmoe,mixtral")
    parser.add_argument(
        "--mixtral-layers",
        type=int,
        default=8,
        help="Mixtral-shaped model depth (memory: 32 is 93 GB of bf16 weights, twice that with transformers' copy)",
    )
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--weights", default=",".join(WEIGHTS))
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--peers", default="eager,static", help="transformers rows: eager, static; empty: none")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of the decode rows")
    parser.add_argument("--new", type=int, default=128, help="new tokens per compiled decode row")
    parser.add_argument("--new-eager", type=int, default=16, help="new tokens per eager decode row")
    parser.add_argument("--new-hf", type=int, default=16, help="new tokens per transformers row")
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill measurement (0: none)")
    parser.add_argument("--hf-timeout", type=int, default=300, help="seconds for all transformers rows of a shape")
    parser.add_argument(
        "--tmp",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the exported transformers checkpoint is written",
    )
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate.py needs a CUDA device")
    if args.hf_worker:
        return hf_worker(args)
    bandwidth = copy_bandwidth()
    header = (
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}, "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), greedy, prompt {args.prompt}, "
        f"{args.new} new tokens (eager rows {args.new_eager}, transformers {args.new_hf}), prefill "
        f"{args.prefill} tokens at batch 1, int4 group size {INT4_GROUP}; command: python "
        f"scripts/bench_generate.py {' '.join(sys.argv[1:])}"
    )
    print(header, flush=True)
    lines = [
        header,
        "",
        "| model | weights | implementation | batch | decode tokens/s | ms per step | roofline "
        "tokens/s | of roofline | prefill tokens/s | weights GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in args.models.split(","):
        lines += [format_row(r) for r in bench_shape(key, args, bandwidth)]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
