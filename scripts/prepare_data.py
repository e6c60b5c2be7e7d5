"""Tokenize a corpus into train/val token files for training: the Python standard library (default), or your own
text / JSON-lines / parquet files with any Hugging Face tokenizer.

python scripts/prepare_data.py --out data/stdlib-byte
python scripts/prepare_data.py --out data/stdlib-bpe --tokenizer bpe --vocab-size 4096
python scripts/prepare_data.py --files 'corpus/**/*.jsonl' --format jsonl --text-field text \\
    --tokenizer path/to/hf-checkpoint --out data/mine
python scripts/prepare_data.py --files chats.jsonl --format jsonl --prompt-field prompt --response-field response \\
    --tokenizer path/to/tokenizer.json --eos-token '</s>' --out data/sft     # loss on the responses only
python scripts/prepare_data.py --recipe configs/data/code-100m.yaml --download .corpus  # the pinned wheels, by part
python scripts/prepare_data.py --recipe configs/data/code-100m.yaml --wheels .corpus --out data/code-100m

A --recipe (configs/data/) pins the wheels whose Python sources make a code corpus; --wheels names directories
holding them (or their part subdirectories), each checked against its sha256; the recipe fixes its own seed and
val fraction. --tokenizer is "byte" (the default, except for a recipe), "bpe" (trained on the train split; for a
recipe, the default, on a seeded sample of it at the recipe's vocabulary size) or a Hugging Face tokenizer.json / a
checkpoint directory holding one.
An error is reported in one line with exit status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse
import os
import time

from moeformer.errors import reported_errors
from moeformer.training.corpus_recipe import download_wheels, load_recipe, prepare_recipe
from moeformer.training.data import DEFAULT_BPE_VOCAB, TOKENIZERS, prepare_corpus
from moeformer.training.tokenizer import BPETokenizer, ByteTokenizer, PretrainedTokenizer, Tokenizer
from moeformer.training.user_data import FORMATS, prepare_user_data, train_texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output directory (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", help="byte, bpe, or a tokenizer.json / HF checkpoint dir")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"BPE vocabulary size including 256 bytes and 2 specials (default {DEFAULT_BPE_VOCAB})",
    )
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share of files/documents held out")
    parser.add_argument("--max-files", type=int, default=None, help="stdlib: only the first N sorted files")
    parser.add_argument("--files", action="append", help="glob of your files (repeatable; '**' recurses)")
    parser.add_argument("--recipe", help="a pinned corpus recipe (configs/data/*.yaml)")
    parser.add_argument(
        "--wheels", action="append", default=[], help="directory holding a recipe's wheels (repeatable)"
    )
    parser.add_argument("--download", metavar="DIR", help="fetch a recipe's wheels with pip into DIR/<part>/ and stop")
    parser.add_argument("--format", choices=FORMATS, default="text", help="how --files hold documents")
    parser.add_argument("--text-field", default="text", help="jsonl/parquet field holding a document")
    parser.add_argument("--prompt-field", help="instruction data: the prompt's field (loss on the response only)")
    parser.add_argument("--response-field", help="instruction data: the response's field")
    parser.add_argument("--eos-token", help="the eos token of a tokenizer.json whose directory does not say it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split of documents")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    args.tokenizer = args.tokenizer or ("bpe" if args.recipe else "byte")
    if not args.out and not args.download:
        parser.error("--out is required")
    if (args.wheels or args.download) and not args.recipe:
        parser.error("--wheels and --download go with --recipe")
    if args.recipe and args.files:
        parser.error("--recipe and --files are two different sources; give one")
    return args


def user_tokenizer(args: argparse.Namespace, fields: dict) -> Tokenizer:
    if args.tokenizer == "byte":
        return ByteTokenizer()
    if args.tokenizer == "bpe":
        texts = train_texts(args.files, args.format, val_fraction=args.val_fraction, seed=args.seed, **fields)
        return BPETokenizer.train(texts, args.vocab_size or DEFAULT_BPE_VOCAB)
    return PretrainedTokenizer(args.tokenizer, eos_token=args.eos_token)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    start = time.perf_counter()
    with reported_errors(args.debug):
        if args.download:
            download_wheels(load_recipe(args.recipe), args.download)
            print(f"the wheels of {args.recipe} are in {args.download}/<part>/, their hashes checked")
            return None
        if args.recipe:
            tokenizer = None if args.tokenizer == "bpe" else user_tokenizer(args, {})
            meta = prepare_recipe(args.out, args.recipe, args.wheels, tokenizer, args.vocab_size, args.workers)
        elif args.files:
            fields = dict(
                text_field=args.text_field, prompt_field=args.prompt_field, response_field=args.response_field
            )
            meta = prepare_user_data(
                args.out,
                args.files,
                args.format,
                user_tokenizer(args, fields),
                val_fraction=args.val_fraction,
                seed=args.seed,
                workers=args.workers,
                **fields,
            )
        elif args.tokenizer not in TOKENIZERS:
            raise ValueError("the stdlib corpus takes --tokenizer byte or bpe; a tokenizer file needs --files")
        else:
            meta = prepare_corpus(
                args.out,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                val_fraction=args.val_fraction,
                max_files=args.max_files,
            )
    splits = ", ".join(
        f"{name}: {s['documents']} documents, {s['tokens']:,} tokens" for name, s in meta["splits"].items()
    )
    print(
        f"{meta['tokenizer']} tokenizer (vocab {meta['vocab_size']}, {meta['dtype']}) -> {args.out} | {splits} | "
        f"{time.perf_counter() - start:.1f}s"
    )
    return meta


if __name__ == "__main__":
    main()
