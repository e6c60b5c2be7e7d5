"""Prune (or merge) the routed experts of a MoE checkpoint: measure how each expert is used on calibration windows of
a prepared token corpus, keep the experts ranked first in every MoE layer, and write a checkpoint whose config has
the new expert count.

    python scripts/prune_experts.py runs/small-moe/model runs/small-moe-6 --keep 6 --calibration data/stdlib-bpe \
        [--batches 16] [--criterion load|router_mass] [--merge] [--format native|hf] [--keep-total N]

Calibration windows come from the train split (the validation split stays held out), spread evenly over it. The
tokenizer and corpus files beside the source weights (meta.json, tokenizer.json, ...) are copied along, and
`pruning.json` records the kept experts and the measured usage. An error is one line with exit status 1 (`--debug`
shows its traceback).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moeformer.errors import reported_errors
from moeformer.models.checkpoint import HF_CONFIG, INDEX_FILE, NATIVE_CONFIG, hub_blobs, save_pretrained
from moeformer.models.compress import CRITERIA, check_prunable, expert_usage, plan_pruning, prune_experts
from moeformer.models.model import from_pretrained
from moeformer.safe_files import copy_confined
from moeformer.training.data import TokenDataset

PLAN_FILE = "pruning.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory (native or Hugging Face)")
    parser.add_argument("dst", help="directory to write the pruned checkpoint to")
    parser.add_argument("--keep", type=int, default=None, help="experts to keep in every MoE layer")
    parser.add_argument("--keep-total", type=int, default=None, help="experts to keep over all MoE layers")
    parser.add_argument("--calibration", default=None, help="data directory written by scripts/prepare_data.py")
    parser.add_argument("--batches", type=int, default=16, help="calibration batches")
    parser.add_argument("--batch", type=int, default=8, help="windows per calibration batch")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="calibration window length (default: min(1024, the model's max_seq_len))",
    )
    parser.add_argument(
        "--criterion",
        default="load",
        choices=CRITERIA,
        help="rank experts by routed tokens (load) or routed weight (router_mass)",
    )
    parser.add_argument("--merge", action="store_true", help="fold removed experts into the nearest kept ones")
    parser.add_argument("--format", default="native", choices=("native", "hf"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def calibration_batches(data_dir: str, seq_len: int, batches: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """`batches` batches of `batch` windows of the train split, spread evenly over it (all windows if fewer)."""
    dataset = TokenDataset.from_dir(data_dir, "train", seq_len)
    count = min(len(dataset), batches * batch)
    indices = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(np.int64))
    return [dataset.get_batch(indices[i : i + batch]) for i in range(0, len(indices), batch)]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the files of `src` that are not its weights or config (tokenizer, meta.json, generation config, README)
    into `dst`; returns their names. Symlinks are followed only within `src` (or a Hugging Face hub cache's blobs):
    one leading elsewhere is not copied."""
    owned = {HF_CONFIG, NATIVE_CONFIG, INDEX_FILE, PLAN_FILE}
    names = [e.name for e in sorted(src.iterdir()) if e.name not in owned and e.suffix != ".safetensors"]
    return copy_confined(src, dst, names, hub_blobs(src))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with reported_errors(args.debug):
        if (args.keep is None) == (args.keep_total is None):
            raise ValueError("give exactly one of --keep K (experts per MoE layer) and --keep-total N")
        if args.calibration is None:
            raise ValueError(
                "--calibration DATA_DIR is required: experts are ranked by their use on calibration "
                "windows of a prepared corpus (scripts/prepare_data.py)"
            )
        if Path(args.dst).resolve() == Path(args.src).resolve():
            raise ValueError(f"the pruned checkpoint needs a directory of its own, not the source {args.src}")
        if args.batches < 1 or args.batch < 1:
            raise ValueError(f"--batches and --batch must be positive, got {args.batches}, {args.batch}")
        model = from_pretrained(args.src, device=args.device)
        saved_dtype = model.tok_embeddings.weight.dtype
        model.float()  # usage and merged averages in fp32; saved back in the checkpoint's dtype
        check_prunable(model, args.keep, args.keep_total)  # a bad count fails before the calibration pass
        seq_len = args.seq_len or min(1024, model.config.max_seq_len)
        usage = expert_usage(model, calibration_batches(args.calibration, seq_len, args.batches, args.batch))
        plan = plan_pruning(model, args.keep, args.keep_total, args.criterion, usage)
        pruned = prune_experts(model, plan, usage=usage, merge=args.merge)
        dst = save_pretrained(pruned, args.dst, format=args.format, dtype=saved_dtype)
        copied = copy_side_files(Path(args.src), dst)
        record = {
            "source": str(args.src),
            "criterion": args.criterion,
            "merge": args.merge,
            "num_experts": pruned.config.moe.num_experts,
            "kept": {str(i): e for i, e in plan.items()},
            "usage": {str(i): {"counts": u.counts.tolist(), "mass": u.mass.tolist()} for i, u in usage.items()},
        }
        (dst / PLAN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    before, after = model.config.moe.num_experts, pruned.config.moe.num_experts
    print(
        f"{'merged' if args.merge else 'pruned'} {before} -> {after} experts per MoE layer "
        f"({sum(p.numel() for p in pruned.parameters()) / 1e6:.1f}M parameters) into {dst}"
        + (f"; copied {', '.join(copied)}" if copied else "")
    )
    return record


if __name__ == "__main__":
    main()
