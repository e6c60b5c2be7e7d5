"""Tokenize the Python standard library's sources into train/val token files for training.

python scripts/prepare_data.py --out data/stdlib-byte
python scripts/prepare_data.py --out data/stdlib-bpe --tokenizer bpe --vocab-size 4096
"""

from __future__ import annotations

import argparse
import time

from moeformer.training.data import DEFAULT_BPE_VOCAB, TOKENIZERS, prepare_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"BPE vocabulary size including 256 bytes and 2 specials (default {DEFAULT_BPE_VOCAB})",
    )
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share of files held out for validation")
    parser.add_argument("--max-files", type=int, default=None, help="use only the first N sorted files (quick tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    meta = prepare_corpus(
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        max_files=args.max_files,
    )
    splits = ", ".join(f"{name}: {s['documents']} files, {s['tokens']:,} tokens" for name, s in meta["splits"].items())
    print(
        f"{meta['tokenizer']} tokenizer (vocab {meta['vocab_size']}, {meta['dtype']}) -> {args.out} | {splits} | "
        f"{time.perf_counter() - start:.1f}s"
    )
    return meta


if __name__ == "__main__":
    main()
