"""Held-out loss of a checkpoint directory on a prepared token split, in full precision or with quantized weights.

    python scripts/eval_loss.py --model runs/small-moe/model --data data/stdlib-bpe [--quantize int8|int4]
        [--group-size 128] [--dtype bf16] [--split val] [--seq-len 1024] [--batch 16]

Every window of the split is scored (packed documents, as in training: positions restart and no target crosses a
document boundary); the result is the token-weighted mean next-token cross-entropy, printed as one JSON line. An
error is one line with exit status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from moeformer.errors import reported_errors
from moeformer.models.checkpoint import DTYPE_NAMES
from moeformer.models.model import from_pretrained
from moeformer.training.data import TokenDataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (native or Hugging Face)")
    parser.add_argument("--data", required=True, help="directory written by scripts/prepare_data.py")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"), help="weight-only quantization")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64 or 128)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


@torch.no_grad()
def held_out_loss(model, dataset: TokenDataset, batch: int, device: str) -> tuple[float, int]:
    """(mean next-token cross-entropy over every window of `dataset`, number of scored tokens)."""
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch):
        b = {k: v.to(device) for k, v in dataset.get_batch(range(start, min(start + batch, len(dataset)))).items()}
        out = model(
            b["input_ids"],
            targets=b["targets"],
            position_ids=b["position_ids"],
            document_ids=b["document_ids"],
            return_logits=False,
        )
        tokens = int(b["targets"].numel())
        total += out.ce_loss.double().item() * tokens
        count += tokens
    return total / count, count


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with reported_errors(args.debug):
        model = from_pretrained(
            args.model,
            dtype=DTYPE_NAMES[args.dtype],
            device=args.device,
            quantize=args.quantize,
            group_size=args.group_size,
        )
        dataset = TokenDataset.from_dir(args.data, args.split, args.seq_len)
        loss, tokens = held_out_loss(model, dataset, args.batch, args.device)
    result = {
        "model": args.model,
        "split": args.split,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "group_size": args.group_size if args.quantize == "int4" else None,
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": tokens,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
