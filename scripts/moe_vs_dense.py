"""Quality experiment: small-moe vs small-dense (equal active parameters) on the same tokens for the same steps.

    python scripts/prepare_data.py --out data/stdlib-bpe --tokenizer bpe --vocab-size 8192
    torchrun --nproc_per_node 1 scripts/moe_vs_dense.py --steps 2000 [--dotted.key=value ...]

One epoch of a larger corpus (no train token seen twice), one model per GPU, then the report of both runs:

    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node 1 scripts/moe_vs_dense.py --only small-moe \
        --steps epoch --out runs/code-100m --data.dir=data/code-100m &
    CUDA_VISIBLE_DEVICES=1 torchrun --standalone --nproc_per_node 1 scripts/moe_vs_dense.py --only small-dense \
        --steps epoch --out runs/code-100m --data.dir=data/code-100m &
    wait; python scripts/moe_vs_dense.py --report --out runs/code-100m

Both runs use configs/train/small-{moe,dense}-gpu.yaml with identical data, seed, schedule and overrides, so they see
the same batches in the same order. Writes <out>/results.json, <out>/results.md (validation loss, tokens/s, MFU,
steps, tokens seen and the epochs of the train split they make) and <out>/loss.png (train and validation curves).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeformer.models.params import count_params
from moeformer.training.config import load_config
from moeformer.training.data import epoch_steps, load_meta
from moeformer.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "small-moe": REPO / "configs/train/small-moe-gpu.yaml",
    "small-dense": REPO / "configs/train/small-dense-gpu.yaml",
}


def summarize(name: str, out_dir: Path) -> dict:
    """Final validation loss, the validation curve and throughput of one finished run (medians over the logged
    steps, leaving out the first tenth of training: start-up, allocator and kernel warm-up)."""
    records = read_metrics(out_dir)
    logged = [r for r in records if r["split"] == "train"]
    train = [r for r in logged if r["step"] > 0.1 * logged[-1]["step"]]
    val = [(r["step"], r["loss"]) for r in records if r["split"] == "val"]
    config = load_config(out_dir / "config.yaml")
    params = count_params(config.model_config())
    mfu = [r["mfu"] for r in train if "mfu" in r]
    train_tokens = load_meta(config.data.dir)["splits"]["train"]["tokens"]
    return {
        "model": name,
        "corpus": config.data.dir,
        "train_tokens": train_tokens,
        "steps": logged[-1]["step"],
        "tokens": logged[-1]["tokens"],
        "epochs": logged[-1]["tokens"] / train_tokens,
        "params_total": params.total,
        "params_active": params.active,
        "final_val_loss": val[-1][1],
        "val_curve": val,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in train) if train else None,
    }


def markdown(results: list[dict]) -> str:
    first = results[0]
    lines = [
        f"small-moe vs small-dense, {first['steps']} steps on the same tokens ({first['corpus']}, "
        f"{first['train_tokens']:,} train tokens; {first['tokens']:,} seen, {first['epochs']:.2f} epochs):",
        "",
        "| model | total params | active params | final val loss | tokens/s | MFU | peak mem (GiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['params_total'] / 1e6:.1f}M | {r['params_active'] / 1e6:.1f}M | "
            f"{r['final_val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_steps(spec: str, config) -> int:
    """`spec` steps, or with "epoch" those of one pass over the train split for this run's batch layout; says how
    many epochs of the train split the steps make."""
    d, t = config.data, config.train
    epoch = epoch_steps(d.dir, d.seq_len, d.micro_batch_size, t.grad_accum, int(os.environ.get("WORLD_SIZE", "1")))
    steps = epoch if spec == "epoch" else int(spec)
    print(f"{steps} steps: {steps / epoch:.2f} epochs of {d.dir}'s train split ({epoch} steps each)", flush=True)
    return steps


def train_run(config, evaluate_first: bool = False) -> None:
    """Train the run of `config` to its end (with `evaluate_first`, its step-0 validation loss logged first), then
    free its memory for the next run of this process."""
    from moeformer.training.trainer import Trainer

    trainer = Trainer(config)
    if evaluate_first:
        trainer.evaluate()
    trainer.train()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finish(out: Path, only: str | None, report: Callable[[Path], Any]) -> Any:
    """Leave the process group; then rank 0 of a process that trained every run reports them (None elsewhere)."""
    from moeformer.parallel import shutdown_distributed

    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) != 0 or only:
        return None
    return report(out)


def report(out: Path) -> list[dict]:
    """Combine the finished runs under `out` into results.json, results.md and loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    from plot_run import plot_losses  # scripts/ is on sys.path when this file runs as a script

    missing = [name for name in RUNS if not (out / name / "config.yaml").is_file()]
    if missing:
        raise SystemExit(f"no finished {missing[0]} run under {out}; train it first (--only {missing[0]})")
    results = [summarize(name, out / name) for name in RUNS]
    if len({(r["corpus"], r["steps"], r["tokens"]) for r in results}) != 1:
        raise SystemExit(f"the runs under {out} differ in corpus, steps or tokens: not a like-for-like comparison")
    table = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    plot_losses({name: read_metrics(out / name) for name in RUNS}, out / "loss.png")
    print(table)
    return results


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="2000", help="optimizer steps, or 'epoch': one pass over the train split")
    parser.add_argument("--out", default="runs/moe_vs_dense")
    parser.add_argument("--only", choices=sorted(RUNS), help="train this model only (e.g. one per GPU)")
    parser.add_argument("--report", action="store_true", help="train nothing: combine the finished runs in --out")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    if args.report:
        return report(out)

    for name, path in RUNS.items():
        if args.only not in (None, name):
            continue
        config = load_config(path, overrides + [f"--out_dir={out / name}"])
        steps = run_steps(args.steps, config)
        train_run(load_config(path, overrides + [f"--train.steps={steps}", f"--out_dir={out / name}"]))
    return finish(out, args.only, report)


if __name__ == "__main__":
    main()
