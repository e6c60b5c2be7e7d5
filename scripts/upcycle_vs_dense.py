"""Quality experiment: a dense model upcycled into a mixture of experts vs the same dense model trained as long.

    python scripts/prepare_data.py --out data/stdlib-bpe --tokenizer bpe --vocab-size 8192
    torchrun --nproc_per_node 1 scripts/upcycle_vs_dense.py --pretrain-steps 1000 --steps 1000 [--dotted.key=value ...]

Phase 1 (`pretrain`) trains small-dense (configs/train/small-dense-gpu.yaml) for --pretrain-steps and exports it.
Phase 2 continues it twice for --steps: `dense` from its own export, `moe` from its upcycled copy (every MLP becomes
--num-experts experts, top --top-k; with --noise 0 the copy computes the dense function at step 0). Both start with
`model.init_from`, a fresh optimizer and the same lr schedule, and both continue the data stream where phase 1
stopped (`data.start_batch`), so they see the same batches, none of which phase 1 saw (before a second epoch):
"the dense model trained N more steps" on new data, as pretraining goes on; restarting the stream instead would
replay phase 1's batches in phase 1's order, which rewards memorising them.
Both log the validation loss at step 0 and every `train.eval_every` steps. Phase 2 on two GPUs, then the report:

    CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 1 scripts/upcycle_vs_dense.py --only pretrain --out runs/upcycle
    CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node 1 --master_port 29501 scripts/upcycle_vs_dense.py --only dense \
        --out runs/upcycle &
    CUDA_VISIBLE_DEVICES=1 torchrun --nproc_per_node 1 --master_port 29502 scripts/upcycle_vs_dense.py --only moe \
        --out runs/upcycle &
    wait; python scripts/upcycle_vs_dense.py --report --out runs/upcycle

Writes <out>/results.json, <out>/results.md (validation loss of both at equal tokens and its difference in nats) and
<out>/loss.png. Overrides apply to every phase.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from moe_vs_dense import finish, summarize, train_run  # scripts/ is on sys.path when this file runs as a script

from moeformer.models.checkpoint import save_pretrained
from moeformer.models.model import from_pretrained
from moeformer.models.upcycle import upcycle
from moeformer.training.config import RunConfig, load_config
from moeformer.training.metrics import read_metrics
from moeformer.training.tokenizer import copy_tokenizer_files

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/train/small-dense-gpu.yaml"
PHASES = ("pretrain", "dense", "moe")


def upcycle_checkpoint(src: Path, dst: Path, num_experts: int, top_k: int, noise: float) -> None:
    """Write the upcycled MoE of the dense checkpoint `src` (native, its dtype, its tokenizer files) to `dst`."""
    dense = from_pretrained(src)
    moe = upcycle(dense, num_experts, top_k, noise=noise, generator=torch.Generator().manual_seed(0))
    copy_tokenizer_files(src, save_pretrained(moe, dst, format="native"))


def continuation(config: Path, overrides: list[str], out: Path, phase: str, init: Path, steps: int) -> RunConfig:
    """Phase 2's run `phase` from the weights `init`: the pretrain run's settings, its data stream continued."""
    done = load_config(out / "pretrain" / "config.yaml")
    start = done.data.start_batch + done.train.steps * done.train.grad_accum  # global batches phase 1 drew
    return load_config(
        config,
        overrides
        + [
            f"--model.init_from={init}",
            f"--data.start_batch={start}",
            f"--train.steps={steps}",
            f"--out_dir={out / phase}",
        ],
    )


def continue_pretrained(args: argparse.Namespace, overrides: list[str], out: Path) -> None:
    """Phase 2: the dense and the upcycled continuation (or the one --only names), each logging step-0 validation."""
    from moeformer.parallel import init_distributed

    dense = out / "pretrain" / "model"
    if not dense.is_dir():
        raise SystemExit(f"no exported pretrain run under {out}; train it first (--only pretrain)")
    if args.only in (None, "dense"):
        train_run(continuation(args.config, overrides, out, "dense", dense, args.steps), evaluate_first=True)
    if args.only in (None, "moe"):
        init_distributed()
        if dist.get_rank() == 0:
            upcycle_checkpoint(dense, out / "upcycled", args.num_experts, args.top_k, args.noise)
        dist.barrier()
        moe = continuation(args.config, overrides, out, "moe", out / "upcycled", args.steps)
        train_run(moe, evaluate_first=True)


def report(out: Path) -> dict:
    """Combine the three finished runs under `out` into results.json, results.md and loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    from plot_run import plot_losses

    missing = [phase for phase in PHASES if not (out / phase / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"no finished {missing[0]} run under {out}; train it first (--only {missing[0]})")
    runs = {phase: summarize(phase, out / phase) for phase in PHASES}
    dense, moe = runs["dense"], runs["moe"]
    if (dense["corpus"], dense["steps"], dense["tokens"]) != (moe["corpus"], moe["steps"], moe["tokens"]):
        raise SystemExit(f"the dense and moe runs under {out} differ in corpus, steps or tokens")
    starts = {load_config(out / phase / "config.yaml").data.start_batch for phase in ("dense", "moe")}
    if len(starts) != 1:
        raise SystemExit(f"the dense and moe runs under {out} start at different data positions: {sorted(starts)}")
    tokens_per_step = dense["tokens"] / dense["steps"]
    moe_val = dict(moe["val_curve"])
    rows = [
        {
            "step": step,
            "tokens": round(step * tokens_per_step),
            "tokens_since_init": runs["pretrain"]["tokens"] + round(step * tokens_per_step),
            "dense_val_loss": loss,
            "moe_val_loss": moe_val[step],
            "moe_ahead_nats": loss - moe_val[step],
        }
        for step, loss in dense["val_curve"]
        if step in moe_val
    ]
    experts = load_config(out / "moe" / "config.yaml").model_config().moe
    results = {**runs, "num_experts": experts.num_experts, "top_k": experts.top_k, "table": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot_losses({"dense": read_metrics(out / "dense"), "upcycled moe": read_metrics(out / "moe")}, out / "loss.png")
    print(table)
    return results


def markdown(results: dict) -> str:
    pre, dense, moe = (results[phase] for phase in PHASES)
    lines = [
        f"{pre['params_total'] / 1e6:.1f}M-parameter dense model trained {pre['steps']} steps ({pre['tokens']:,} "
        f"tokens of {pre['corpus']}, val loss {pre['final_val_loss']:.4f}), then {dense['steps']} more steps on the "
        f"same next batches as it is (dense) and upcycled ({results['num_experts']} experts, top-{results['top_k']}: "
        f"{moe['params_total'] / 1e6:.1f}M parameters, {moe['params_active'] / 1e6:.1f}M active); fresh optimizer "
        f"and lr schedule for both; {(pre['tokens'] + dense['tokens']) / pre['train_tokens']:.2f} epochs of the "
        f"{pre['train_tokens']:,}-token train split in all:",
        "",
        "| step | tokens | tokens since init | dense val loss | upcycled val loss | upcycled ahead (nats) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["table"]:
        lines.append(
            f"| {r['step']} | {r['tokens']:,} | {r['tokens_since_init']:,} | {r['dense_val_loss']:.4f} | "
            f"{r['moe_val_loss']:.4f} | {r['moe_ahead_nats']:+.4f} |"
        )
    lines += [
        "",
        "| run | tokens/s | peak mem (GiB) |",
        "| --- | ---: | ---: |",
    ]
    for name, r in (("dense", dense), ("upcycled moe", moe)):
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="steps of the dense model before upcycling")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each continuation")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the dense model's training config")
    parser.add_argument("--out", default="runs/upcycle_vs_dense")
    parser.add_argument("--only", choices=PHASES, help="run this phase only (phase 2: one continuation per GPU)")
    parser.add_argument("--report", action="store_true", help="train nothing: combine the finished runs in --out")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.0, help="per-expert perturbation of the upcycled copies")
    args, overrides = parser.parse_known_args(argv)
    out = Path(args.out)
    if args.report:
        return report(out)

    if args.only in (None, "pretrain"):
        steps = [f"--train.steps={args.pretrain_steps}", f"--out_dir={out / 'pretrain'}"]
        train_run(load_config(args.config, overrides + steps))
    if args.only != "pretrain":
        continue_pretrained(args, overrides, out)
    return finish(out, args.only, report)


if __name__ == "__main__":
    main()
