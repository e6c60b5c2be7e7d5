"""Sample text from a trained model (the `model/` directory a training run exports).

    python scripts/sample.py --model runs/tiny-moe-cpu/model --prompt "def " --max-new-tokens 200

Training documents start after an eos token, so the prompt is encoded as [eos] + prompt.
"""

from __future__ import annotations

import argparse

import torch

from moeformer.models.checkpoint import from_pretrained
from moeformer.training.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (with meta.json of its tokenizer)")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compiled static-cache decoding (CUDA graphs on GPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    model = from_pretrained(args.model, dtype=torch.float32)
    tokenizer = load_tokenizer(args.model)
    prompt = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(args.prompt)] * args.num_samples)
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos=tokenizer.eos_id, generator=generator, compile=args.compile)
    # a model whose vocabulary is padded beyond the tokenizer's can emit unused ids: they are dropped
    texts = [tokenizer.decode(row[1:][row[1:] < tokenizer.vocab_size].tolist()) for row in out]
    for i, text in enumerate(texts):
        print(f"---- sample {i} ----\n{text}")
    return texts


if __name__ == "__main__":
    main()
