"""The compression table of a trained MoE model: expert pruning (with and without merging, with and without a short
healing fine-tune), weight-only int8/int4, and a dense student distilled from the model against the same student
trained from scratch for the same steps; for each, total / active parameters, weight memory, greedy decode tokens/s
at batch 1 and the held-out loss.

    python scripts/compression_table.py --teacher runs/small-moe/model --data data/stdlib-bpe --out runs/compress \
        [--keep 6,4] [--criterion router_mass|load] [--heal-steps 200] [--heal-lr 5e-4] [--heal-warmup 10] \
        [--heal-distill-alpha 1] [--student-steps 2000] [--alpha 0.5,0.9] [--temperature 1.0] \
        [--set train.grad_accum=1 ...] [--nproc 1]

Every step runs as its own process: scripts/prune_experts.py (calibration on the train split), scripts/train.py under
torchrun for the healing runs (`model.init_from` the pruned checkpoint, the model section taken from its config,
distilled from the original model by `train.distill` unless --heal-distill-alpha is 0) and the two students
(`--student-config`, with and without `train.distill`), and this script's `--measure` mode (held-out loss as
scripts/eval_loss.py computes it, decode speed as scripts/bench_generate.py measures ours, compiled on CUDA). Outputs
stay under --out (checkpoints, runs/, logs/, results/<row>.json), and a rerun skips what is done (`--redo`
recomputes), so an interrupted table continues where it stopped. Prints the markdown table and writes it to
<out>/table.md. The teacher must be a native export of a zoo model (as scripts/train.py writes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from moeformer.errors import reported_errors
from moeformer.models.compress import CRITERIA

SCRIPTS = Path(__file__).resolve().parent
# Healing recipe: distillation from the original model alone (the KL to its logits says what pruning changed; the
# data's next tokens also pull the model away from what it had learned), a short warmup and a peak lr of half the
# teacher run's peak (small-moe-gpu: 1e-3). A CPU-sized MoE trained at peak lr 2e-3, pruned 8 -> 6 (+6.75% loss),
# after 100 steps: cross-entropy +1.67% at lr 2e-4, +1.35% at 5e-4; alpha 1: +0.85% at 2e-4, +0.15% at 5e-4, +0.03%
# at 1e-3, +0.23% at 2e-3; alpha 0.5 at 5e-4: +0.57%.
HEAL_ALPHA, HEAL_LR, HEAL_WARMUP = 1.0, 5e-4, 10


class Row(NamedTuple):
    key: str  # file name of its results
    label: str
    model: Path  # checkpoint directory measured
    quantize: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="native export of the trained MoE model (runs/<run>/model)")
    parser.add_argument("--data", help="prepared corpus the teacher was trained on (scripts/prepare_data.py)")
    parser.add_argument("--out", help="directory for every checkpoint, run, log and result")
    parser.add_argument("--keep", default="6,4", help="experts per MoE layer of the pruned rows")
    parser.add_argument("--calibration-batches", type=int, default=16, help="batches of 8 windows for pruning")
    parser.add_argument(
        "--criterion",
        default="router_mass",
        choices=CRITERIA,
        help="pruning keeps the experts with the most routed weight (router_mass) or routed tokens (load)",
    )
    parser.add_argument("--heal-steps", type=int, default=200, help="fine-tuning steps of the healed rows (0: none)")
    parser.add_argument(
        "--heal-lr",
        type=float,
        default=HEAL_LR,
        help="peak lr of healing, cosine down to a tenth (the teacher run peaked at 1e-3 and ended at 1e-4)",
    )
    parser.add_argument(
        "--heal-warmup", type=int, default=HEAL_WARMUP, help="warmup steps of healing (the optimizer starts fresh)"
    )
    parser.add_argument(
        "--heal-distill-alpha",
        default=str(HEAL_ALPHA),
        help="train.distill.alpha of healing, the original model as teacher (0: cross-entropy only); a list "
        "(0,1) heals once per value",
    )
    parser.add_argument(
        "--heal-config",
        default="configs/train/small-moe-gpu.yaml",
        help="run config the healing runs start from (its model section is replaced)",
    )
    parser.add_argument(
        "--student-config",
        default="configs/train/small-dense-gpu.yaml",
        help="run config of both students (0 --student-steps: no student rows)",
    )
    parser.add_argument("--student-steps", type=int, default=2000)
    parser.add_argument(
        "--alpha",
        default="0.5",
        help="train.distill.alpha of the distilled student; a list (0.5,0.9) trains one per value",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="train.distill.temperature of the distilled heals and students"
    )
    parser.add_argument("--quantize", default="int8,int4", help="weight-only formats of the original ('' for none)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64 or 128)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every training run, e.g. train.grad_accum=1 (repeatable)",
    )
    parser.add_argument(
        "--student-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the student runs only (repeatable)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes per training run (torchrun)")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-new", type=int, default=256)
    parser.add_argument(
        "--decode",
        default=None,
        choices=("compiled", "eager"),
        help="decode mode (default: compiled on CUDA, the hardware's limit; eager on CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--redo", action="store_true", help="recompute steps whose outputs exist")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--measure", default=None, metavar="MODEL", help=argparse.SUPPRESS)  # the child mode
    parser.add_argument("--measure-quantize", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is None and not (args.teacher and args.data and args.out):
        parser.error("--teacher, --data and --out are required")
    return args


# ---- one measured row (child process) ----------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> dict:
    """Held-out loss, decode tokens/s at batch 1, parameters and weight bytes of one checkpoint, loaded in bf16 on
    CUDA (fp32 on CPU), quantized while loading when asked."""
    sys.path.insert(0, str(SCRIPTS))
    from bench_generate import ours_rates, weight_bytes
    from eval_loss import held_out_loss

    from moeformer.models.model import from_pretrained
    from moeformer.models.params import count_params
    from moeformer.training.data import TokenDataset

    cuda = args.device.startswith("cuda")
    model = from_pretrained(
        args.measure,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device=args.device,
        quantize=args.measure_quantize,
        group_size=args.group_size,
    )
    dataset = TokenDataset.from_dir(args.data, "val", min(args.eval_seq_len, model.config.max_seq_len))
    loss, tokens = held_out_loss(model, dataset, args.eval_batch, args.device)
    mode = args.decode or ("compiled" if cuda else "eager")
    decode = ours_rates(model, 1, args.decode_prompt, args.decode_new, compile=mode == "compiled")[0]
    params = count_params(model.config)
    moe = model.config.moe
    return {
        "loss": loss,
        "tokens": tokens,
        "decode_tps": decode,
        "decode_mode": mode,
        "total_params": params.total,
        "active_params": params.active,
        "weight_bytes": weight_bytes(model)["total"],
        "experts": moe.num_experts if moe else None,
    }


# ---- steps (each a process, skipped when done) -------------------------------------------------------------------
class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        for sub in ("logs", "results", "configs", "runs"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def run(self, name: str, command: list[str]) -> str:
        """Run `command`, its output to logs/<name>.log; a failure stops the table with the log's last lines."""
        log = self.out / "logs" / f"{name}.log"
        print(f"[{name}] {' '.join(command)}", flush=True)
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True, check=False)
        text = log.read_text()
        if done.returncode:
            print("\n".join(text.splitlines()[-15:]), file=sys.stderr)
            raise RuntimeError(f"{name} failed (exit {done.returncode}); its output is in {log}")
        return text

    def prune(self, keep: int, merge: bool) -> Path:
        criterion = "" if self.args.criterion == "load" else f"-{self.args.criterion}"
        dst = self.out / f"pruned-{keep}{'-merged' if merge else ''}{criterion}"
        if self.args.redo or not (dst / "pruning.json").is_file():
            self.run(
                dst.name,
                [
                    sys.executable,
                    str(SCRIPTS / "prune_experts.py"),
                    self.args.teacher,
                    str(dst),
                    "--keep",
                    str(keep),
                    "--calibration",
                    self.args.data,
                    "--batches",
                    str(self.args.calibration_batches),
                    "--criterion",
                    self.args.criterion,
                    *(["--merge"] if merge else []),
                ],
            )
        return dst

    def train(self, name: str, config: str | Path, overrides: list[str]) -> Path:
        """A training run under torchrun in runs/<name> (resumed if an earlier attempt left checkpoints); its
        exported model directory."""
        run_dir = self.out / "runs" / name
        if self.args.redo and run_dir.exists():
            shutil.rmtree(run_dir)
        if not (run_dir / "model" / "config.yaml").is_file():
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(self.args.nproc),
                str(SCRIPTS / "train.py"),
                "--config",
                str(config),
                "--resume",
                "auto",
                f"--out_dir={run_dir}",
                f"--data.dir={self.args.data}",
                "--checkpoint.every=0",
                "--checkpoint.export=native",
                "--train.progress_bar=false",
                *overrides,
                *(f"--{kv}" for kv in self.args.set),
            ]
            self.run(name, command)
        return run_dir / "model"

    def heal_config(self, pruned: Path) -> Path:
        """configs/heal-<name>.yaml: --heal-config with the model section of the pruned checkpoint (its zoo name plus
        every field) and `init_from` it."""
        from moeformer.models.config import ModelConfig

        model = ModelConfig.from_yaml(pruned / "config.yaml").to_dict()
        base = yaml.safe_load(Path(self.args.heal_config).read_text())
        base["model"] = {**model, "init_from": str(pruned)}
        config = self.out / "configs" / f"heal-{pruned.name}.yaml"
        config.write_text(yaml.safe_dump(base, sort_keys=False))
        return config

    def heal_runs(self, pruned: Path, how: str) -> list[tuple[Row, list[str]]]:
        """The healing runs of a pruned checkpoint, one per --heal-distill-alpha (distilled from the original model
        when alpha > 0): each row, whose label says the recipe, with the run's config overrides."""
        a = self.args
        runs = []
        for alpha in [float(x) for x in a.heal_distill_alpha.split(",") if x]:
            # the recipe is in the key: a rerun with another recipe in the same --out trains anew
            recipe = f"{f'kd{alpha:g}-t{a.temperature:g}' if alpha else 'ce'}-lr{a.heal_lr:g}-w{a.heal_warmup}"
            key = f"healed-{pruned.name}-{a.heal_steps}-{recipe}"
            loss = f"distilled, alpha {alpha:g}, T {a.temperature:g}" if alpha else "cross-entropy"
            label = f"{how} + {a.heal_steps}-step heal ({loss}, lr {a.heal_lr:g})"
            overrides = [
                f"--train.steps={a.heal_steps}",
                f"--optim.lr={a.heal_lr}",
                f"--optim.warmup_steps={a.heal_warmup}",
                "--train.eval_every=0",
                *([distill_override(a.teacher, alpha, a.temperature)] if alpha else []),
            ]
            runs.append((Row(key, label, self.out / "runs" / key / "model"), overrides))
        return runs

    def heals(self, pruned: Path, how: str) -> list[Row]:
        """Fine-tune a pruned checkpoint from its weights (`heal_runs`); the healed rows."""
        return [
            row._replace(model=self.train(row.key, self.heal_config(pruned), overrides))
            for row, overrides in self.heal_runs(pruned, how)
        ]

    def students(self) -> list[Row]:
        """The dense student trained from scratch and distilled (one per --alpha) for --student-steps each."""
        a = self.args
        common = [f"--train.steps={a.student_steps}", *(f"--{kv}" for kv in a.student_set)]
        rows = []
        for alpha in [float(x) for x in a.alpha.split(",") if x]:
            key = f"student-distilled-a{alpha:g}-t{a.temperature:g}"
            distill = distill_override(a.teacher, alpha, a.temperature)
            rows.append(
                Row(
                    key,
                    f"dense student, distilled (alpha {alpha:g}, T {a.temperature:g}, {a.student_steps} steps)",
                    self.train(key, a.student_config, [*common, distill]),
                )
            )
        scratch = self.train("student-scratch", a.student_config, common)
        return rows + [Row("student-scratch", f"dense student, from scratch ({a.student_steps} steps)", scratch)]

    def measure(self, row: Row) -> dict:
        path = self.out / "results" / f"{row.key}.json"
        if self.args.redo or not path.is_file():
            a = self.args
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--measure",
                str(row.model),
                "--data",
                a.data,
                "--device",
                a.device,
                "--group-size",
                str(a.group_size),
                "--eval-seq-len",
                str(a.eval_seq_len),
                "--eval-batch",
                str(a.eval_batch),
                "--decode-prompt",
                str(a.decode_prompt),
                "--decode-new",
                str(a.decode_new),
                *(["--measure-quantize", row.quantize] if row.quantize else []),
                *(["--decode", a.decode] if a.decode else []),
            ]
            text = self.run(f"measure-{row.key}", command)
            result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
            path.write_text(
                json.dumps({"label": row.label, "model": str(row.model), "quantize": row.quantize, **result}, indent=1)
                + "\n"
            )
        return json.loads(path.read_text())

    def rows(self) -> list[Row]:
        """Produce every checkpoint of the table (pruning, healing, students) and list the rows to measure."""
        a, teacher = self.args, Path(self.args.teacher)
        rows = [Row("original", "original", teacher)]
        for keep in [int(k) for k in a.keep.split(",") if k]:
            for merge in (False, True):
                pruned = self.prune(keep, merge)
                how = f"{'merged' if merge else 'pruned'} to {keep}"
                rows.append(Row(pruned.name, f"{how} experts", pruned))
                if a.heal_steps:
                    rows += self.heals(pruned, how)
        rows += [Row(mode, f"{mode} weights", teacher, mode) for mode in a.quantize.split(",") if mode]
        if a.student_steps:
            rows += self.students()
        return rows


def distill_override(teacher: str, alpha: float, temperature: float) -> str:
    """The `train.distill` override of a run distilled from `teacher` (a YAML string, whatever the path holds)."""
    return f"--train.distill={{teacher: {json.dumps(teacher)}, alpha: {alpha}, temperature: {temperature}}}"


def table(results: list[dict], args: argparse.Namespace) -> str:
    """The markdown table, then the two goals checked on these numbers."""
    base = results[0]["loss"]
    header = (
        "model",
        "experts",
        "total params",
        "active params",
        "weights",
        "decode tok/s (b1)",
        "val loss",
        "vs original",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['experts'] or '-'} | {r['total_params'] / 1e6:.1f}M | "
            f"{r['active_params'] / 1e6:.1f}M | {r['weight_bytes'] / 2**20:.1f} MiB | "
            f"{r['decode_tps']:.0f} | {r['loss']:.4f} | {100 * (r['loss'] - base) / base:+.2f}% |"
        )
    by_key = {r["key"]: r for r in results}
    notes = [
        f"\npruning criterion: {args.criterion}; held-out loss: every {args.eval_seq_len}-token window of the val "
        "split; decode: greedy, batch 1, "
        f"{args.decode_new} tokens after a {args.decode_prompt}-token prompt, {results[0]['decode_mode']}."
    ]
    for key in [k for k in by_key if k.startswith("healed-")]:
        cost = 100 * (by_key[key]["loss"] - base) / base
        notes.append(f"{by_key[key]['label']}: {cost:+.2f}% of the original's loss (goal at 8 -> 6 experts: <= +1%)")
    for key in [k for k in by_key if k.startswith("student-distilled") and "student-scratch" in by_key]:
        gain = by_key["student-scratch"]["loss"] - by_key[key]["loss"]
        notes.append(f"{by_key[key]['label']} vs from scratch: {gain:+.4f} nats better (goal: >= 0.03)")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> str | dict:
    args = parse_args(argv)
    with reported_errors(args.debug):
        if args.measure is not None:
            result = measure(args)
            print(json.dumps(result))
            return result
        driver = Driver(args)
        results = [{"key": row.key, **driver.measure(row)} for row in driver.rows()]
        text = table(results, args)
        (driver.out / "table.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
