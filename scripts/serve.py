"""Serve a checkpoint directory (a training run's native export with its meta.json tokenizer, or a Hugging Face
checkpoint with its tokenizer.json) over HTTP with OpenAI's completions API, many requests batched together by one
engine.

    python scripts/serve.py --model runs/tiny-moe-cpu/model --port 8000 [--quantize int8|int4] [--max-batch 64]
    torchrun --nproc_per_node 2 scripts/serve.py --model path/to/hf-checkpoint --tp 2     # or --ep 2 (MoE)

    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "def fib(n):", "max_tokens": 64, "temperature": 0, "stop": ["\\n\\n"]}'

Endpoints: POST /v1/completions (stream=true for server-sent events), GET /v1/models, GET /health. Under torchrun
the model is split with moeformer.parallel as in training; rank 0 answers HTTP and schedules, the other ranks step
with it. An error at start-up is one line with exit status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moeformer.errors import reported_errors
from moeformer.serving.loading import add_model_arguments, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--name", default=None, help="model name clients ask for (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MOEFORMER_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $MOEFORMER_API_KEY, else none)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=64, help="requests decoded together at most")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + max_tokens limit (default: the model's max_seq_len)"
    )
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt prefixes")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (under torchrun)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (under torchrun, MoE models)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with reported_errors(args.debug):
        import torch.distributed as dist

        from moeformer.parallel import ParallelConfig, shutdown_distributed
        from moeformer.serving import Engine
        from moeformer.serving.runner import EngineRunner

        try:
            import uvicorn

            from moeformer.serving.server import create_app
        except ImportError as e:
            raise ImportError(f"{e}: the server needs the serve extra (pip install 'moeformer[serve]')") from e
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != max(args.tp, args.ep):  # every rank holds a different part of one copy of the model
            raise ValueError(
                f"--tp {args.tp} --ep {args.ep} serves one copy of the model over max(tp, ep) = "
                f"{max(args.tp, args.ep)} processes, got {world} (torchrun --nproc_per_node "
                f"{max(args.tp, args.ep)})"
            )
        several = world > 1
        model, tokenizer = load_model(args, ParallelConfig(tp=args.tp, ep=args.ep) if several else None)
        # the ranks exchange each step's plan and tokens as Python objects: a CPU (gloo) group carries them
        engine = Engine(
            model,
            max_batch=args.max_batch,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            prefix_caching=not args.no_prefix_caching,
            compile=args.compile,
            eos_token_id=tokenizer.eos_id,
            group=dist.new_group(backend="gloo") if several else None,
        )
        if not several:
            engine.warmup()  # compiles ahead of traffic (a multi-rank engine compiles as its steps come)
        if several and dist.get_rank() != 0:
            engine.follow()
        else:
            name = args.name or Path(args.model).resolve().name
            try:
                app = create_app(EngineRunner(engine), tokenizer, name, api_key=args.api_key)
                # on SIGINT/SIGTERM, streams still running after a few seconds are cut (and their requests aborted)
                uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)
            finally:
                engine.close()
        if several:
            shutdown_distributed()


if __name__ == "__main__":
    main()
