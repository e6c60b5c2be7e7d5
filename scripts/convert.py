"""Convert checkpoints between Hugging Face and moeformer-native formats, optionally changing dtype.

    python scripts/convert.py SRC DST --to hf|native [--dtype bfloat16] [--max-shard-size 5GB]

SRC is any checkpoint directory `moeformer.from_pretrained` reads (HF config.json or native config.yaml). DST may be
SRC: files of DST that are not part of the checkpoint (tokenizer, README...) are kept. An error is reported in one
line with exit status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse

from moeformer.errors import reported_errors
from moeformer.models.checkpoint import DTYPE_NAMES, FORMATS, save_pretrained
from moeformer.models.model import from_pretrained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint directory to read")
    parser.add_argument("dst", help="directory to write (replaced atomically if it holds a checkpoint)")
    parser.add_argument("--to", choices=FORMATS, default="hf", help="output format (default: hf)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="parameter dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB or 5GB (default: 5GB)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else None
    with reported_errors(args.debug):
        model = from_pretrained(args.src, dtype=dtype)
        path = save_pretrained(model, args.dst, format=args.to, max_shard_size=args.max_shard_size)
    print(f"wrote {args.to} checkpoint of {model.num_params():,} parameters to {path}")


if __name__ == "__main__":
    main()
