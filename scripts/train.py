"""Train a zoo model on the DeepSpeed engine.

    torchrun --nproc_per_node 2 scripts/train.py --config configs/train/tiny-moe-cpu.yaml [--dotted.key=value ...]
    python scripts/train.py --config configs/train/tiny-moe-cpu.yaml --resume auto     # one process, no torchrun

Any config key can be overridden with a dotted flag (`--optim.lr=1e-3`, `--model.moe.top_k=1`); `--resume auto`
continues from the newest checkpoint of the run's out_dir that verifies. A resume refuses a configuration that differs
from the checkpoint's unless the changes are named: `--resume-allow optim.lr,train.steps` (a section name covers its
keys; where the run writes, logs, evaluates and checkpoints may always change). An error is reported in one line (per
failing rank) with exit status 1; `--debug` (or MOEFORMER_DEBUG=1) shows its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import warnings

from moeformer.errors import reported_errors
from moeformer.training.config import load_config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The script's own options and the dotted config overrides (--resume and --resume-allow among them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (configs/train/*.yaml); defaults otherwise")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint directory (= --checkpoint.resume)")
    parser.add_argument(
        "--resume-allow",
        default=None,
        metavar="KEYS",
        help="comma-separated config keys a resume may change (= --checkpoint.resume_allow)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    if args.resume_allow is not None:
        overrides.append(f"--checkpoint.resume_allow=[{args.resume_allow}]")
    return args, overrides


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    with reported_errors(args.debug):
        config = load_config(args.config, overrides)
        from moeformer.parallel import shutdown_distributed
        from moeformer.training.trainer import Trainer  # after the config is valid: importing DeepSpeed takes seconds

        # DeepSpeed still calls collectives that torch.distributed marks deprecated, once per step
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        summary = Trainer(config).train()
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, model in {summary['exported']}")
    return summary


if __name__ == "__main__":
    main()
