"""Generate text from a checkpoint directory: a training run's exported model (native, with its meta.json
tokenizer) or a Hugging Face checkpoint (with its tokenizer.json).

    python scripts/generate.py --model runs/tiny-moe-cpu/model --prompt "def " --max-new-tokens 200
    python scripts/generate.py --model path/to/hf-checkpoint --prompt "Hello" --quantize int4 --compile \
        --temperature 0.7 --top-p 0.9

Training documents start after an eos token, so a native model's prompt is encoded as [eos] + prompt; a Hugging Face
tokenizer adds its own special tokens. Prints each sample, then the decode speed; an error is one line with exit
status 1 (`--debug` shows its traceback).
"""

from __future__ import annotations

import argparse

import torch

from moeformer.errors import reported_errors
from moeformer.models.generation import StepTimer
from moeformer.serving.loading import add_model_arguments, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=2, help="rows generated together (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    with reported_errors(args.debug):
        model, tokenizer = load_model(args)
        prompt = torch.tensor([tokenizer.encode_prompt(args.prompt)] * args.num_samples, device=args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        options = dict(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos=tokenizer.eos_id,
            generator=generator,
            compile=args.compile,
        )
        clock = StepTimer(args.device)
        out = model.generate(prompt, args.max_new_tokens, stream=clock, **options)
        first, decode = clock.seconds()
    new = out[:, prompt.shape[1] :]
    # a model whose vocabulary is padded beyond the tokenizer's can emit unused ids: they are dropped
    texts = [args.prompt + tokenizer.decode(row[row < tokenizer.vocab_size].tolist()) for row in new]
    for i, text in enumerate(texts):
        print(f"---- sample {i} ----\n{text}")
    steps = clock.steps - 1
    rate = f"decode {steps * args.num_samples / decode:.1f} tokens/s" if steps > 0 else "one step"
    print(f"---- {steps + 1} steps x {args.num_samples} rows: first token after {first:.2f} s, {rate}")
    return texts


if __name__ == "__main__":
    main()
