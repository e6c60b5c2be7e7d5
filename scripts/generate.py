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
from moeformer.models.checkpoint import DTYPE_NAMES
from moeformer.models.generation import StepTimer
from moeformer.models.model import from_pretrained
from moeformer.training.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (native or Hugging Face)")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--num-samples", type=int, default=2, help="rows generated together (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", default=None, choices=("int8", "int4"), help="weight-only quantization")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64 or 128)")
    parser.add_argument("--compile", action="store_true", help="static cache, compiled decode (CUDA graph on GPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES),
                        help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    dtype = DTYPE_NAMES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    with reported_errors(args.debug):
        model = from_pretrained(args.model, dtype=dtype, device=args.device, quantize=args.quantize,
                                group_size=args.group_size)
        tokenizer = load_tokenizer(args.model)
        prompt = torch.tensor([tokenizer.encode_prompt(args.prompt)] * args.num_samples, device=args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos=tokenizer.eos_id,
                       generator=generator, compile=args.compile)
        clock = StepTimer(args.device)
        out = model.generate(prompt, args.max_new_tokens, stream=clock, **options)
        first, decode = clock.seconds()
    new = out[:, prompt.shape[1]:]
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
