"""Training throughput of one run config under each parallel layout, the real trainer (DeepSpeed) each time:
tokens/s (median over the steps after the warm-up), peak memory, and the host synchronisations of one training step.

    python scripts/bench_layouts.py --config configs/train/medium-moe-gpu.yaml [--layouts one,dp2,ep2,ep2_a2a,tp2,pp2]
                                    [--steps 30] [--warmup 10] [--out-dir runs/bench-layouts] [--repeat 1]
                                    [--report] [--profile]
                                    [--dotted.key=value ...]

Layouts of two GPUs (one, dp2, ep2, ep2_a2a, tp2, pp2) and of four (dp4, ep4, ep2_dp2, tp2_dp2, pp2_dp2, pp2_ep2). Each
runs `torchrun --nproc_per_node <gpus>` on this file as the worker, which trains like scripts/train.py with
--out_dir=<out-dir>/<layout> (replaced; no checkpoint is written) and the layout's keys (last: they win); its log is
<out-dir>/<layout>.log; --report only reads the runs back (layouts run in separate commands; each with the --steps and
--warmup it ran with, written to <out-dir>/<layout>/bench.json). The pipeline layouts run in compile mode "default"
whatever the flags (the trainer replays no CUDA graphs in a pipeline). Columns: "vs dp" against the data-parallel layout
of as many GPUs (one, dp2, dp4), "scaling vs one GPU" = tokens/s / (GPUs x one's tokens/s). Host syncs: the
synchronising CUDA calls of the last warm-up step (moeformer.training.metrics.HostSyncs; on CPU, the ops that would
sync); optimizer step ms: DeepSpeed's `engine.step` calls of the step before it, timed with the device synchronised
(fixed cost per step: it grows with the parameters, not the tokens; n/a for the pipeline engine). `--profile` (CUDA):
every rank profiles its last step (one step of the median, a little slower); rank 0's device time by kernel kind, NCCL
included, and its idle time are printed and kept in <out-dir>/<layout>/profile.txt, its NCCL kernel time by collective
as a share of the step's wall time fills the last column, and its Chrome trace of the step (host with Python stacks,
device) is written to <out-dir>/<layout>/trace.json.gz. `--repeat N` runs the layouts in turn N rounds (round r in
<out-dir>/round<r>): tokens/s is each layout's median over the rounds, "vs dp" and the scaling the medians of each
round's ratio (a run against its peer's run beside it in time, so that a slower spell of the machine's host, which moves
a host-bound step by 10-30%, meets both), and each round's tokens/s is listed below the table. Other dotted flags go to
every run, e.g. `--train.compile_mode=reduce-overhead` (CUDA graphs) or `--model.n_layers=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from moeformer.parallel.groups import free_port

NO_GRAPHS = {"train.compile_mode": "default"}  # the trainer replays no CUDA graphs in a pipeline
LAYOUTS = {  # name -> (processes, parallel overrides)
    "one": (1, {}),
    "dp2": (2, {}),
    "ep2": (2, {"parallel.ep": 2}),  # the dispatcher "auto" picks: the all-gather for a dropless model
    "ep2_a2a": (2, {"parallel.ep": 2, "parallel.ep_dispatcher": "all_to_all"}),
    "tp2": (2, {"parallel.tp": 2}),
    "pp2": (2, {"parallel.pp": 2, **NO_GRAPHS}),
    "dp4": (4, {}),
    "ep4": (4, {"parallel.ep": 4}),  # "auto": the all-to-all (the all-gather is taken up to ep=2)
    "ep2_dp2": (4, {"parallel.ep": 2}),
    "tp2_dp2": (4, {"parallel.tp": 2}),
    "pp2_dp2": (4, {"parallel.pp": 2, **NO_GRAPHS}),
    "pp2_ep2": (4, {"parallel.pp": 2, "parallel.ep": 2, **NO_GRAPHS}),
}
DATA_PARALLEL = {1: "one", 2: "dp2", 4: "dp4"}  # each GPU count's plain data-parallel layout: the "vs dp" peer


def worker(config_path: str, overrides: list[str], sync_step: int, profile_last: bool = False) -> None:
    """One rank of one layout: scripts/train.py's run, counting the host syncs of step `sync_step` (the last
    warm-up step: the profiler slows it); `profile_last` (CUDA): every rank profiles the last step, rank 0 writes
    where its device time went to <out_dir>/profile.txt and the step's trace to <out_dir>/trace.json.gz."""
    from moeformer.parallel import shutdown_distributed
    from moeformer.training.config import load_config
    from moeformer.training.metrics import HostSyncs
    from moeformer.training.trainer import Trainer

    config = load_config(config_path, overrides)
    trainer = Trainer(config)
    step, counted = trainer.train_step, {"steps": config.train.steps, "warmup": sync_step}
    engine_step, optimizer_seconds = trainer.engine.step, []

    def timed_engine_step(*args, **kwargs):  # the optimizer's share of a step, device work included
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        out = engine_step(*args, **kwargs)
        sync()
        optimizer_seconds.append(time.perf_counter() - start)
        return out

    def train_step(batches):
        if profile_last and torch.cuda.is_available() and trainer.step + 1 == config.train.steps:
            from bench_train import profile  # scripts/ is on sys.path when this file runs as a script

            records = []
            trace = str(Path(config.out_dir) / "trace.json.gz") if trainer.rank == 0 else None
            profiled = profile(lambda: records.append(step(batches)), trace=trace)
            if trainer.rank == 0:
                (Path(config.out_dir) / "profile.txt").write_text(f"{profiled}\n")
            counted["profiled_wall_ms"], counted["collectives_ms"] = profiled.wall_ms, profiled.collectives_ms
            return records[0]
        if trainer.step + 1 == sync_step - 1:  # the step before: the engine's (optimizer) steps timed
            trainer.engine.step = timed_engine_step
            record = step(batches)
            del trainer.engine.step
            counted["optimizer_ms"] = 1e3 * sum(optimizer_seconds) if optimizer_seconds else None  # pipeline: none
            return record
        if trainer.step + 1 != sync_step:
            return step(batches)
        with HostSyncs() as syncs:
            record = step(batches)
        counted["host_syncs"] = syncs.count
        return record

    trainer.train_step = train_step
    trainer.train()
    if trainer.rank == 0:
        (Path(config.out_dir) / "bench.json").write_text(json.dumps(counted))
    shutdown_distributed()


MARKER = ".bench_layouts"  # in each layout directory this script made: only those are replaced


def fresh_layout_dir(out: Path) -> None:
    """An empty `out` for a layout's run: this script's earlier run of it is removed (the trainer would append to its
    metrics), anything else there is an error, never deleted."""
    if out.exists():
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out} exists and was not made by bench_layouts.py: choose another --out-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("a scripts/bench_layouts.py run: replaced by the next run of this layout\n")


def run_layout(name: str, args: argparse.Namespace, overrides: list[str], out_dir: Path) -> dict | None:
    """Train `name`'s layout in `out_dir`; its median tokens/s after the warm-up, peak memory and host syncs of one
    step (None: the run failed)."""
    nproc, keys = LAYOUTS[name]
    out = out_dir / name
    fresh_layout_dir(out)
    flags = [
        f"--out_dir={out}",
        f"--train.steps={args.steps}",
        "--train.log_every=1",
        "--train.progress_bar=false",
        "--checkpoint.enabled=false",  # no checkpoint per layout (medium-moe's: ~14 GB to write)
        "--checkpoint.every=0",
        *overrides,
        *(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        __file__,
        "--worker",
        "--config",
        args.config,
        "--warmup",
        str(args.warmup),
        *(["--profile"] if args.profile else []),
        *flags,
    ]
    log = out_dir / f"{name}.log"
    print(f"{name}: {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        print(f"{name} failed (exit {rc}): see {log}", flush=True)
        return None
    if (out / "profile.txt").is_file():
        print(f"{name}: rank 0's last step by kernel kind\n{(out / 'profile.txt').read_text()}", flush=True)
    return read_layout(name, out_dir)


def read_layout(name: str, out_dir: Path) -> dict | None:
    """The results of layout `name`'s run in `out_dir`, over the steps after its own warm-up (None: it did not
    finish)."""
    out = out_dir / name
    if not (out / "bench.json").is_file():
        print(f"{name}: no finished run in {out}", flush=True)
        return None
    counted = json.loads((out / "bench.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["split"] == "train" and r["step"] > counted["warmup"]]
    compiled = yaml.safe_load((out / "config.yaml").read_text())["train"]["compile"]  # as the run resolved it
    return {
        "gpus": LAYOUTS[name][0],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_gib": max(r["peak_mem_gib"] for r in timed),
        "host_syncs": counted.get("host_syncs"),
        "optimizer_ms": counted.get("optimizer_ms"),
        "tokens_per_step": records[0]["tokens"] / records[0]["step"],
        "compiled": compiled,
        "steps": counted["steps"],
        "warmup": counted["warmup"],
        "profiled_wall_ms": counted.get("profiled_wall_ms"),  # --profile: rank 0's last step
        "collectives_ms": counted.get("collectives_ms"),
    }


def merge_rounds(runs: list[dict | None]) -> dict | None:
    """One layout's runs over the rounds as one result: median tokens/s and optimizer time, peak memory's maximum,
    the rest from the first round (None: a run failed)."""
    if any(r is None for r in runs):
        return None
    optimizer = [r["optimizer_ms"] for r in runs if r["optimizer_ms"] is not None]
    return {
        **runs[0],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "rounds": [r["tokens_per_s"] for r in runs],
        "peak_gib": max(r["peak_gib"] for r in runs),
        "optimizer_ms": statistics.median(optimizer) if optimizer else None,
    }


def median_ratio(rounds: list[dict], name: str, peer: str, per: int = 1) -> float | None:
    """Median over the rounds of tokens/s of `name` / (`per` x those of `peer` in the same round): each run against
    the peer's run beside it in time (None: the peer was not run, or a run failed)."""
    pairs = [(runs.get(name), runs.get(peer)) for runs in rounds]
    if any(a is None or b is None for a, b in pairs):
        return None
    return statistics.median(a["tokens_per_s"] / (per * b["tokens_per_s"]) for a, b in pairs)


def nccl_share(r: dict) -> str:
    """The profiled step's NCCL kernel time as a share of its wall time, by collective ("n/a" without --profile)."""
    if r["collectives_ms"] is None:
        return "n/a"
    wall, parts = r["profiled_wall_ms"], sorted(r["collectives_ms"].items(), key=lambda kv: -kv[1])
    detail = ", ".join(f"{name} {100 * ms / wall:.0f}%" for name, ms in parts)
    return f"{100 * sum(r['collectives_ms'].values()) / wall:.0f}%" + (f" ({detail})" if detail else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (configs/train/*.yaml)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each run")
    parser.add_argument(
        "--warmup", type=int, default=10, help="steps left out of the median (compilation); --report: each run's own"
    )
    parser.add_argument("--out-dir", default="runs/bench-layouts")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the layouts in turn this many rounds (round r in <out-dir>/round<r>); --report: read that many back",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only print the table of the layouts' runs already in --out-dir (run them one by one "
        "where a command may not take long)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: print where rank 0's last step's device time goes, by kernel kind (NCCL included)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(args.config, overrides, args.warmup, args.profile)
    layouts = args.layouts.split(",")
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise SystemExit(f"unknown layouts {unknown} (choose from {list(LAYOUTS)})")
    if not 1 <= args.warmup < args.steps or args.repeat < 1:
        raise SystemExit(
            f"need 1 <= --warmup < --steps and --repeat >= 1, got --warmup {args.warmup} --steps {args.steps} "
            f"--repeat {args.repeat}"
        )
    dirs = [Path(args.out_dir) / (f"round{r}" if args.repeat > 1 else "") for r in range(1, args.repeat + 1)]
    rounds = []
    for out_dir in dirs:  # the layouts in turn, round after round: a slow spell of the machine meets every layout
        out_dir.mkdir(parents=True, exist_ok=True)
        rounds.append(
            {n: read_layout(n, out_dir) if args.report else run_layout(n, args, overrides, out_dir) for n in layouts}
        )
    results = {name: merge_rounds([runs[name] for runs in rounds]) for name in layouts}
    settings = sorted({(r["steps"], r["warmup"]) for r in results.values() if r is not None})
    steps = "; ".join(f"steps {n} (median of the last {n - w})" for n, w in settings) or "no finished run"
    each = f"{args.repeat} rounds: tokens/s, vs dp and scaling are medians over the rounds, " if args.repeat > 1 else ""
    print(
        f"\n{args.config}, {each}{steps}, overrides {' '.join(overrides) or 'none'}\n\n| layout | GPUs | compiled | "
        "tokens/s | vs dp (same GPUs) | peak GiB | host syncs per step | step ms | optimizer step ms | tokens per step "
        "| scaling vs one GPU | NCCL share of step |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        if r is None:
            logs = ", ".join(str(d / f"{name}.log") for d, runs in zip(dirs, rounds) if runs[name] is None)
            print(f"| {name} | {LAYOUTS[name][0]} | | failed: see {logs} |" + " |" * 8)
            continue
        ratio = median_ratio(rounds, name, DATA_PARALLEL[r["gpus"]])
        scaling = median_ratio(rounds, name, "one", per=r["gpus"])
        optimizer = "n/a" if r["optimizer_ms"] is None else f"{r['optimizer_ms']:.1f}"  # pipeline: no engine.step
        step_ms = 1e3 * r["tokens_per_step"] / r["tokens_per_s"]
        print(
            f"| {name} | {r['gpus']} | {'yes' if r['compiled'] else 'no'} | {r['tokens_per_s']:,.0f} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {r['peak_gib']:.1f} | {r['host_syncs']} | {step_ms:.1f} "
            f"| {optimizer} | {r['tokens_per_step']:,.0f} | {'n/a' if scaling is None else f'{scaling:.2f}'} | "
            f"{nccl_share(r)} |"
        )
    if args.repeat > 1:
        print("\ntokens/s of each round:")
        for name, r in results.items():
            if r is not None:
                print(f"  {name}: {' / '.join(f'{t:,.0f}' for t in r['rounds'])}")
    if None in results.values():
        raise SystemExit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the worker imports moeformer from the repository
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
