"""Upcycle a dense checkpoint into a mixture of experts whose experts start as copies of its MLPs.

    python scripts/upcycle.py SRC DST --num-experts 8 --top-k 2 [--noise 0.01] [--shared-expert] [--to hf|native]

SRC is a dense Hugging Face (Llama family) or native checkpoint directory. With --noise 0 (the default) the result
computes exactly the dense function (see moeformer.upcycle); train it with `model.init_from: DST`. --to hf writes
the Mixtral layout, or Qwen2-MoE with --shared-expert. The tokenizer files of SRC are copied to DST. An error is
reported in one line with exit status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse

import torch

from moeformer.errors import reported_errors
from moeformer.models.checkpoint import DTYPE_NAMES, FORMATS, save_pretrained
from moeformer.models.model import from_pretrained
from moeformer.models.params import count_params
from moeformer.models.upcycle import upcycle
from moeformer.training.tokenizer import copy_tokenizer_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="dense checkpoint directory to read")
    parser.add_argument("dst", help="directory to write (replaced atomically if it holds a checkpoint)")
    parser.add_argument("--num-experts", type=int, required=True, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token")
    parser.add_argument("--noise", type=float, default=0.0, help="per-expert perturbation, in weight std units")
    parser.add_argument("--shared-expert", action="store_true", help="add a gated shared expert (Qwen2-MoE layout)")
    parser.add_argument("--to", choices=FORMATS, default="native", help="output format (default: native)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="parameter dtype (default: the source's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router and noise draws")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    with reported_errors(args.debug):
        dense = from_pretrained(args.src, dtype=DTYPE_NAMES[args.dtype] if args.dtype else None)
        model = upcycle(
            dense,
            args.num_experts,
            args.top_k,
            noise=args.noise,
            shared_expert=args.shared_expert,
            generator=torch.Generator().manual_seed(args.seed),
        )
        path = save_pretrained(model, args.dst, format=args.to)
        copied = copy_tokenizer_files(args.src, path)
    count = count_params(model.config)
    print(
        f"wrote {args.to} MoE checkpoint ({count.total:,} parameters, {count.active:,} active) to {path}"
        + (f" with {', '.join(copied)}" if copied else "")
    )


if __name__ == "__main__":
    main()
