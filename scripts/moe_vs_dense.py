"""Quality experiment: small-moe vs small-dense (equal active parameters) on the same tokens for the same steps.

    python scripts/prepare_data.py --out data/stdlib-bpe --tokenizer bpe --vocab-size 8192
    torchrun --nproc_per_node 1 scripts/moe_vs_dense.py --steps 2000 [--dotted.key=value ...]

Both runs use configs/train/small-{moe,dense}-gpu.yaml with identical data, seed, schedule and overrides, so they see
the same batches in the same order. Writes <out>/results.json, <out>/results.md (validation loss, tokens/s, MFU)
and <out>/loss.png (train and validation curves of both).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from pathlib import Path

import torch

from moeformer.models.params import count_params
from moeformer.training.config import load_config
from moeformer.training.data import load_meta
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
    params = count_params(load_config(out_dir / "config.yaml").model_config())
    mfu = [r["mfu"] for r in train if "mfu" in r]
    return {
        "model": name,
        "params_total": params.total,
        "params_active": params.active,
        "final_val_loss": val[-1][1],
        "val_curve": val,
        "tokens": train[-1]["tokens"] if train else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train) if train else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in train) if train else None,
    }


def markdown(results: list[dict], steps: int, corpus: str) -> str:
    lines = [
        f"small-moe vs small-dense, {steps} steps on the same tokens ({corpus}):",
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


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="runs/moe_vs_dense")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)

    from moeformer.parallel import shutdown_distributed
    from moeformer.training.trainer import Trainer

    for name, path in RUNS.items():
        config = load_config(path, overrides + [f"--train.steps={args.steps}", f"--out_dir={out / name}"])
        trainer = Trainer(config)
        trainer.train()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shutdown_distributed()
    if int(os.environ.get("RANK", "0")) != 0:
        return None

    import matplotlib

    matplotlib.use("Agg")
    from plot_run import plot_losses  # scripts/ is on sys.path when this file runs as a script

    results = [summarize(name, out / name) for name in RUNS]
    meta = load_meta(config.data.dir)
    corpus = f"stdlib corpus, {meta['tokenizer']} tokenizer, {meta['splits']['train']['tokens']:,} train tokens"
    table = markdown(results, args.steps, corpus)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    plot_losses({name: read_metrics(out / name) for name in RUNS}, out / "loss.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
