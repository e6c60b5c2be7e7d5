"""A checkpoint directory loaded to generate from, with its tokenizer: the command-line options and the loading that
scripts/generate.py and scripts/serve.py share. A native training export brings its corpus tokenizer (meta.json),
a Hugging Face checkpoint its tokenizer.json."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from moeformer.models.checkpoint import DTYPE_NAMES
from moeformer.models.model import from_pretrained
from moeformer.parallel import apply_expert_parallel, apply_tensor_parallel, init_distributed, init_parallel_groups
from moeformer.parallel.config import ParallelConfig
from moeformer.training.tokenizer import Tokenizer, load_tokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --quantize, --group-size, --compile, --dtype, --device and --debug."""
    parser.add_argument("--model", required=True, help="checkpoint directory (native or Hugging Face)")
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"), help="weight-only quantization")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64 or 128)")
    parser.add_argument("--compile", action="store_true", help="compiled decode (CUDA graph on GPU)")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPE_NAMES), help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def load_model(args: argparse.Namespace, parallel: ParallelConfig | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode on args.device, tokenizer) from the options of `add_model_arguments`. With `parallel`
    (torchrun's ranks; the groups are created as for training) the ranks take turns: each reads the checkpoint on
    the CPU, keeps its shard and moves it to its device, so the host holds one full copy at a time."""
    dtype = DTYPE_NAMES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    options = dict(dtype=dtype, quantize=args.quantize, group_size=args.group_size)
    if parallel is None:
        return from_pretrained(args.model, device=args.device, **options), load_tokenizer(args.model)
    init_distributed()
    groups = init_parallel_groups(parallel)
    for turn in range(dist.get_world_size()):
        if dist.get_rank() == turn:
            model = from_pretrained(args.model, device="cpu", **options)
            groups.config.validate_model(model.config)
            apply_expert_parallel(model, groups)
            apply_tensor_parallel(model, groups)
            model = model.to(args.device)
        dist.barrier()
    return model, load_tokenizer(args.model)
