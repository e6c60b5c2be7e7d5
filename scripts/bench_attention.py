"""Softmax versus linear attention on one GPU (bf16, causal): forward and forward+backward time and peak memory
versus sequence length, to find where linear attention overtakes softmax and to measure our dispatch overhead.

Every call holds the same number of tokens (--tokens, as in the FlashAttention paper): batch = max(1, tokens // T)
at length T, so short lengths time kernels rather than the host's launch overhead. Every row of one length runs on
the same random q, k, v (B, T, H, D): torch SDPA with each kernel forced, our `attend` with backend auto / sdpa / flex
(and flash_attn when installed), our RetNet-style linear attention core (fixed per-head decay, identity feature map:
the layer's "retnet" kind) in its PyTorch chunked form and its fla form (`fla_chunk_bthd`, what `LinearAttention`
calls), and fla's `chunk_simple_gla` called directly. Rows with an O(n^2) or large O(n) working set (SDPA's MATH
kernel, the PyTorch chunked form) are skipped, reason in the table, where their estimate exceeds --max-gib.
Failures (OOM, missing kernels) print "n/a" for that row only.

    python scripts/bench_attention.py [--lengths 1024,4096,16384,65536] [--tokens 65536] [--heads 16]
                                      [--head-dim 128] [--max-gib 20] [--out benchmarks/attention.md]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeformer.layers.attention import AttentionMask, attend
from moeformer.layers.attention.backends import resolve_backend
from moeformer.layers.linear_attention import (
    decayed_linear_attn_chunked,
    fla_available,
    fla_chunk_bthd,
    retnet_log_decay,
)

FORCED_SDPA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
AUTO_TARGET, FLA_TARGET = 1.05, 1.2  # auto softmax / fastest forced SDPA; ours fla / fla direct
LINEAR_CHUNK = 64  # chunk size of the PyTorch chunked linear form (fla's own is 64 too)
# Peak fwd+bwd bytes of the memory-hungry rows, from the tensors they keep (within 10% of H100 runs at batch 1):
MATH_BYTES_PER_SCORE = 16  # SDPA MATH upcasts bf16 to fp32: scores, probabilities and their gradient, (B, H, T, T)
MATH_BYTES_PER_ELEMENT = 24  # and fp32 copies of q, k, v with their gradients, per element of (B, T, H, D)


@dataclass(frozen=True)
class Shape:
    """One length's problem: batch rows of `length` tokens, `heads` heads of `head_dim`."""

    batch: int
    length: int
    heads: int
    head_dim: int

    @property
    def token_heads(self) -> int:
        return self.batch * self.length * self.heads


def batch_for(length: int, tokens: int) -> int:
    """Rows per call so that every length processes about `tokens` tokens (at least one row)."""
    return max(1, tokens // length)


def math_work_gib(s: Shape) -> float:
    """Estimated fwd+bwd working set of SDPA's MATH kernel: the materialised n x n fp32 scores dominate."""
    scores = s.batch * s.heads * s.length**2
    return (MATH_BYTES_PER_SCORE * scores + MATH_BYTES_PER_ELEMENT * s.token_heads * s.head_dim) / 2**30


def chunked_work_gib(s: Shape, chunk: int = LINEAR_CHUNK) -> float:
    """Estimated fwd+bwd working set of the PyTorch chunked linear form: per token and head, fp32 (12 D) for q, k, v
    and their padded and intermediate copies, (3 D^2 / chunk) for the chunk states and updates, (4 chunk) for the
    in-chunk scores and decays."""
    per_token_head = 4 * (12 * s.head_dim + 3 * s.head_dim**2 / chunk + 4 * chunk)
    return per_token_head * s.token_heads / 2**30


def skip_reason(estimate: Callable[[Shape], float] | None, shape: Shape, max_gib: float) -> str | None:
    """Why a row is not run at this shape (its estimated working set is over budget), or None to run it."""
    if estimate is None or estimate(shape) <= max_gib:
        return None
    return f"skipped: estimated {estimate(shape):.1f} GiB > --max-gib {max_gib:g}"


@dataclass
class Inputs:
    """One length's shared tensors: q, k, v and the output gradient in (B, T, H, D), the RetNet log decays (H,)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    decay: torch.Tensor
    scale: float
    mask: AttentionMask  # one per length, so flex builds its block mask once (a model shares it across layers)

    def heads_first(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, T, D) views, the layout the attention layer hands to `attend`."""
        return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)


@dataclass
class Candidate:
    """A benchmarked implementation: `run` maps Inputs to the output in (B, T, H, D)."""

    name: str
    family: str  # "softmax" | "linear"
    role: str  # "forced" (torch SDPA, one kernel), "auto", "ours", "ours_fla", "direct" (fla kernel, no wrapper)
    run: Callable[[Inputs], torch.Tensor]
    work_gib: Callable[[Shape], float] | None = None  # estimated fwd+bwd working set; None: small (flash-style)


@dataclass
class Row:
    """One table line; None marks a measurement that failed or was skipped (`note` says which)."""

    length: int
    batch: int
    name: str
    family: str
    role: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_gib: float | None = None
    note: str = ""  # why a row has no numbers (skipped, or what failed)


def parse_lengths(text: str) -> list[int]:
    """Parse the comma-separated --lengths value into positive ints, e.g. "1024,4096" -> [1024, 4096]."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths needs at least one positive length, got {text!r}")
    return lengths


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_table(rows: Iterable[Row]) -> list[str]:
    """Markdown table lines, one row per (length, implementation)."""
    lines = [
        "| length | batch | implementation | fwd ms | fwd+bwd ms | peak GiB (fwd+bwd) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.length} | {r.batch} | {r.name} | {fmt_ms(r.fwd_ms)} | {fmt_ms(r.fwd_bwd_ms)} | "
            f"{fmt_gib(r.peak_gib)} | {r.note} |"
        )
    return lines


def is_softmax(r: Row) -> bool:
    return r.family == "softmax"


def is_our_linear(r: Row) -> bool:
    return r.family == "linear" and r.role in ("ours", "ours_fla")


def fastest(rows: Iterable[Row], metric: str, keep: Callable[[Row], bool]) -> Row | None:
    """The row with the smallest measured `metric` ("fwd_ms" | "fwd_bwd_ms") among those `keep` accepts."""
    timed = [r for r in rows if keep(r) and getattr(r, metric) is not None]
    return min(timed, key=lambda r: getattr(r, metric), default=None)


def crossover_line(rows: list[Row], metric: str = "fwd_bwd_ms") -> str:
    """From which measured length on our fastest linear path beats the fastest softmax path (and stays ahead)."""
    label = "fwd+bwd" if metric == "fwd_bwd_ms" else "fwd"
    pairs = {}
    for n in sorted({r.length for r in rows}):
        at = [r for r in rows if r.length == n]
        lin, soft = fastest(at, metric, is_our_linear), fastest(at, metric, is_softmax)
        if lin is not None and soft is not None:
            pairs[n] = (lin, soft)
    if not pairs:
        return f"crossover ({label}): n/a (no length has both a linear and a softmax timing)"
    start = None
    for n in sorted(pairs, reverse=True):
        lin, soft = pairs[n]
        if getattr(lin, metric) >= getattr(soft, metric):
            break
        start = n
    if start is None:
        lin, soft = pairs[max(pairs)]
        return (
            f"crossover ({label}): none up to T={max(pairs)} (there: linear {fmt_ms(getattr(lin, metric))} ms "
            f"[{lin.name}] vs softmax {fmt_ms(getattr(soft, metric))} ms [{soft.name}])"
        )
    lin, soft = pairs[start]
    earlier = [n for n in pairs if n < start]
    where = f"between T={max(earlier)} and T={start}" if earlier else f"at or below T={start} (the shortest measured)"
    return (
        f"crossover ({label}): our linear attention beats the fastest softmax path from T={start} on, so the "
        f"crossover lies {where}; at T={start}: linear {fmt_ms(getattr(lin, metric))} ms [{lin.name}] vs "
        f"softmax {fmt_ms(getattr(soft, metric))} ms [{soft.name}]"
    )


def ratio(rows: list[Row], metric: str, num: Callable[[Row], bool], den: Callable[[Row], bool]) -> float | None:
    """Fastest `num` row over fastest `den` row on `metric`, or None when either is missing."""
    a, b = fastest(rows, metric, num), fastest(rows, metric, den)
    return None if a is None or b is None else getattr(a, metric) / getattr(b, metric)


def verdict(values: Iterable[float | None], target: float) -> str:
    measured = [x for x in values if x is not None]
    return "n/a" if not measured else "ok" if max(measured) <= target else "MISSED"


def has_role(role: str) -> Callable[[Row], bool]:
    return lambda r: r.role == role


def ratios_line(rows: list[Row], sdpa_choice: dict[int, str] | None = None) -> str:
    """Per length: auto / fastest forced SDPA kernel and ours-fla / fla-direct, as fwd+bwd (fwd), with verdicts."""
    metrics = ("fwd_bwd_ms", "fwd_ms")
    parts = []
    for n in sorted({r.length for r in rows}):
        at = [r for r in rows if r.length == n]
        forced = fastest(at, "fwd_bwd_ms", has_role("forced"))
        auto = [ratio(at, m, has_role("auto"), has_role("forced")) for m in metrics]
        fla = [ratio(at, m, has_role("ours_fla"), has_role("direct")) for m in metrics]
        dispatch = f", default SDPA dispatch {sdpa_choice[n]}" if sdpa_choice and n in sdpa_choice else ""
        parts.append(
            f"T={n}: auto/fastest forced {fmt_ratio(auto[0])} ({fmt_ratio(auto[1])}) "
            f"[{forced.name if forced else 'n/a'}{dispatch}] {verdict(auto, AUTO_TARGET)}; "
            f"ours-fla/fla-direct {fmt_ratio(fla[0])} ({fmt_ratio(fla[1])}) {verdict(fla, FLA_TARGET)}"
        )
    return f"ratios, fwd+bwd (fwd), targets auto <= {AUTO_TARGET} and ours-fla <= {FLA_TARGET}: " + " | ".join(parts)


def forced_sdpa(backend: SDPBackend) -> Callable[[Inputs], torch.Tensor]:
    """torch SDPA restricted to one kernel (its backward is the forward kernel's own)."""

    def run(x: Inputs) -> torch.Tensor:
        q, k, v = x.heads_first()
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=x.scale).transpose(1, 2)

    return run


def our_softmax(backend: str) -> Callable[[Inputs], torch.Tensor]:
    def run(x: Inputs) -> torch.Tensor:
        q, k, v = x.heads_first()
        return attend(q, k, v, x.mask, window=None, scale=x.scale, backend=backend).transpose(1, 2)

    return run


def our_linear_chunked(x: Inputs) -> torch.Tensor:
    q, k, v = x.heads_first()
    return decayed_linear_attn_chunked(q, k, v, x.decay, scale=x.scale, chunk_size=LINEAR_CHUNK)[0].transpose(1, 2)


def our_linear_fla(x: Inputs) -> torch.Tensor:
    return fla_chunk_bthd(x.q, x.k, x.v, x.decay, scale=x.scale)[0]


def fla_direct() -> Callable[[Inputs], torch.Tensor]:
    """fla's chunk_simple_gla on the same (B, T, H, D) tensors, the per-head decay as g_gamma (natural log)."""
    if not fla_available():

        def missing(x: Inputs) -> torch.Tensor:
            raise RuntimeError("fla-core is not installed (pip install fla-core)")

        return missing
    from fla.ops.simple_gla import chunk_simple_gla

    return lambda x: chunk_simple_gla(x.q, x.k, x.v, g_gamma=x.decay, scale=x.scale)[0]


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def candidates(auto_resolves_to: str) -> list[Candidate]:
    """Every implementation in table order; the first row of each family is the reference for the output check."""
    rows = [
        Candidate(
            f"sdpa forced {b.name}",
            "softmax",
            "forced",
            forced_sdpa(b),
            math_work_gib if b == SDPBackend.MATH else None,
        )
        for b in FORCED_SDPA
    ]
    rows.append(Candidate(f"attend auto (-> {auto_resolves_to})", "softmax", "auto", our_softmax("auto")))
    rows.append(Candidate("attend sdpa", "softmax", "ours", our_softmax("sdpa")))
    if flash_attn_installed():
        rows.append(Candidate("attend flash_attn", "softmax", "ours", our_softmax("flash_attn")))
    rows.append(Candidate("attend flex (compiled)", "softmax", "ours", our_softmax("flex")))
    rows.append(Candidate("fla chunk_simple_gla direct", "linear", "direct", fla_direct()))
    rows.append(Candidate("linear ours, fla (fla_chunk_bthd)", "linear", "ours_fla", our_linear_fla))
    rows.append(Candidate("linear ours, PyTorch chunked", "linear", "ours", our_linear_chunked, chunked_work_gib))
    return rows


def make_inputs(s: Shape) -> Inputs:
    torch.manual_seed(s.length)
    size = (s.batch, s.length, s.heads, s.head_dim)
    q, k, v = (torch.randn(size, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(size, device="cuda", dtype=torch.bfloat16)
    decay = retnet_log_decay(s.heads, device="cuda")
    return Inputs(q, k, v, grad_out, decay, s.head_dim**-0.5, AttentionMask())


def time_ms(fn: Callable[[], None], warmup: int, budget_ms: float, max_iters: int) -> float:
    """Median CUDA-event milliseconds of fn() over as many calls as fit `budget_ms` (3 to `max_iters`).

    Events are recorded around each call without synchronising in between, so the GPU time is measured while the
    host queues ahead (host overhead shows only where it exceeds the GPU work, as in a real step).
    """
    for _ in range(warmup):  # the first call compiles / autotunes
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    iters = max(3, min(max_iters, int(budget_ms / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_gib(fn: Callable[[], None]) -> float:
    """Peak memory that one fn() call allocates beyond what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def attempt(row: str, what: str, fn: Callable[[], float], failures: list[str]) -> float | None:
    """fn() or None after printing why it failed (OOM, a kernel that refuses the shape, a missing package) and adding
    "what (error type)" to `failures`."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (one row's failure must not end the benchmark)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"    {row} {what}: n/a ({type(e).__name__}: {reason})", flush=True)
        failures.append(f"{what} ({type(e).__name__})")
        return None
    finally:
        free_memory()


def measure(c: Candidate, x: Inputs, s: Shape, refs: dict[str, torch.Tensor], args: argparse.Namespace) -> Row:
    """Time forward (no grad) and forward+backward (grads of q, k, v), take the fwd+bwd peak, check the output."""
    length, failures = s.length, []
    row = Row(length, s.batch, c.name, c.family, c.role)
    label = f"{c.name} T={length}"
    leaves = (x.q, x.k, x.v)

    def fwd() -> None:
        with torch.no_grad():
            c.run(x)

    def fwd_bwd() -> None:
        torch.autograd.grad(c.run(x), leaves, x.grad_out)

    def check() -> float:
        with torch.no_grad():
            out = c.run(x)
        ref = refs.setdefault(c.family, out)
        return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()

    def timed(fn: Callable[[], None]) -> float:
        return time_ms(fn, args.warmup, args.budget_ms, args.max_iters)

    began = time.perf_counter()
    rel_err = attempt(label, "forward", check, failures)
    if rel_err is not None:  # a path that cannot run once (no kernel for the shape, OOM) is not timed
        row.fwd_ms = attempt(label, "fwd", lambda: timed(fwd), failures)
        row.fwd_bwd_ms = attempt(label, "fwd+bwd", lambda: timed(fwd_bwd), failures)
    if row.fwd_bwd_ms is not None:
        row.peak_gib = attempt(label, "peak", lambda: peak_gib(fwd_bwd), failures)
    row.note = "failed: " + ", ".join(failures) if failures else ""
    err = "n/a" if rel_err is None else f"{rel_err:.1e}"
    print(
        f"  T={length} B={s.batch} {c.name}: fwd {fmt_ms(row.fwd_ms)} ms, fwd+bwd {fmt_ms(row.fwd_bwd_ms)} ms, "
        f"peak {fmt_gib(row.peak_gib)} GiB, max rel diff vs first {c.family} row {err} "
        f"({time.perf_counter() - began:.1f} s)",
        flush=True,
    )
    return row


def default_sdpa_choice(x: Inputs) -> str:
    """Which kernel torch SDPA's own dispatch picks for this shape (private torch API; "unknown" if it moved)."""
    try:
        q, k, v = x.heads_first()
        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, scale=x.scale)).name
    except Exception:  # noqa: BLE001
        return "unknown"


def header(args: argparse.Namespace) -> str:
    """Device, versions, date, shape and the exact command, for the results file."""

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    command = shlex.join(["python", "scripts/bench_attention.py", *sys.argv[1:]])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {version('triton')}, "
        f"fla-core {version('fla-core')}, flash-attn {version('flash-attn')}, date {date}; bf16, causal, "
        f"{args.tokens} tokens per call (batch = max(1, {args.tokens} // length)), {args.heads} heads, head_dim "
        f"{args.head_dim}; rows whose estimated fwd+bwd working set exceeds {args.max_gib:g} GiB are skipped "
        f"(SDPA MATH: n x n fp32 scores; PyTorch chunked linear: fp32 chunk tensors, chunk {LINEAR_CHUNK}); "
        f"linear = RetNet fixed per-head decay, identity feature map; command: `{command}`"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384,65536", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--tokens", type=int, default=65536, help="tokens per call: batch = max(1, tokens // length) at each length"
    )
    parser.add_argument(
        "--max-gib",
        type=float,
        default=20.0,
        help="skip rows (SDPA MATH, PyTorch chunked linear) whose estimated working set exceeds this",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (the first compiles)")
    parser.add_argument("--budget-ms", type=float, default=400.0, help="timed GPU milliseconds per measurement")
    parser.add_argument("--max-iters", type=int, default=50, help="at most this many timed calls per measurement")
    parser.add_argument("--out", default=None, help="also write the header, table and summary to this file")
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    if args.warmup < 1 or args.max_iters < 3 or min(args.heads, args.head_dim, args.tokens) < 1 or args.max_gib <= 0:
        raise ValueError("--warmup must be >= 1, --max-iters >= 3; --heads, --head-dim, --tokens, --max-gib positive")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU (it times bf16 CUDA kernels); none is available")

    began = time.perf_counter()
    title = header(args)
    print(title, flush=True)
    rows, sdpa_choice = [], {}
    for length in lengths:
        shape = Shape(batch_for(length, args.tokens), length, args.heads, args.head_dim)
        x = make_inputs(shape)
        sdpa_choice[length] = default_sdpa_choice(x)
        refs: dict[str, torch.Tensor] = {}
        for c in candidates(resolve_backend("auto", x.heads_first()[0], x.mask, length)):
            reason = skip_reason(c.work_gib, shape, args.max_gib)
            if reason is None:
                rows.append(measure(c, x, shape, refs, args))
            else:
                rows.append(Row(length, shape.batch, c.name, c.family, c.role, note=reason))
                print(f"  T={length} B={shape.batch} {c.name}: {reason}", flush=True)
        del x, refs
        free_memory()
    lines = [
        title,
        "",
        *format_table(rows),
        "",
        f"- {crossover_line(rows)}; {crossover_line(rows, 'fwd_ms')}",
        f"- {ratios_line(rows, sdpa_choice)}",
    ]
    text = "\n".join(lines)
    print("\n" + text + f"\n\n(total {time.perf_counter() - began:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
