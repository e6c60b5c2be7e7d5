"""Plot a training run's metrics.jsonl as PNGs: loss curves, learning rate / grad norm / throughput, and a heat map
of expert load per MoE layer over training.

    python scripts/plot_run.py runs/tiny-moe-cpu                 # writes runs/tiny-moe-cpu/plots/*.png
    python scripts/plot_run.py runs/a runs/b --out plots/compare  # loss curves of several runs on one plot
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeformer.training.metrics import read_metrics  # noqa: E402


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in `split` records (the last record wins when a resumed run repeats a step)."""
    points = {r["step"]: r[key] for r in records if r["split"] == split and key in r}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_losses(runs: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, records in runs.items():
        steps, loss = series(records, "train", "ce_loss")
        line = ax.plot(steps, loss, alpha=0.5, label=f"{name} train CE")[0]
        steps, val = series(records, "val", "loss")
        if steps:
            ax.plot(steps, val, "o-", color=line.get_color(), label=f"{name} val CE")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(records: list[dict], path: Path) -> None:
    keys = [
        k
        for k in ("lr", "grad_norm", "aux_loss", "tokens_per_s", "mfu", "peak_mem_gib")
        if series(records, "train", k)[0]
    ]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot(*series(records, "train", key))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(records: list[dict], path: Path) -> bool:
    """One heat map per MoE layer: expert (rows) x step (columns), colour = share of routed tokens x num_experts
    (1 = perfectly balanced). Returns False when the run has no MoE layers."""
    steps, loads = series(records, "train", "expert_load")
    if not steps:
        return False
    load = np.asarray(loads)  # (steps, layers, experts)
    layers, experts = load.shape[1], load.shape[2]
    fig, axes = plt.subplots(layers, 1, figsize=(8, 1.0 + 0.25 * experts * layers), sharex=True, squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.imshow(
            load[:, layer].T * experts,
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=2,
            extent=(steps[0], steps[-1], experts - 0.5, -0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="load x num_experts")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None, help="output directory (default: <first run>/plots)")
    args = parser.parse_args(argv)
    runs = {Path(r).name if Path(r).is_dir() else Path(r).parent.name: read_metrics(r) for r in args.runs}
    out = Path(args.out) if args.out else Path(args.runs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss.png"]
    plot_losses(runs, written[0])
    if len(runs) == 1:
        records = next(iter(runs.values()))
        plot_training(records, out / "training.png")
        written.append(out / "training.png")
        if plot_expert_load(records, out / "expert_load.png"):
            written.append(out / "expert_load.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
