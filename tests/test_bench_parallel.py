"""The parallel benchmarks' tiny CPU forms (gloo), so that their GPU runs do not fail on a typo: every layout row of
scripts/bench_layouts.py filled in from the real trainer, and scripts/bench_moe.py --ep 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.workers import REPO, script, worker_env

TINY = [
    "--model.n_layers=2",
    "--model.dim=32",
    "--model.n_heads=2",
    "--model.n_kv_heads=2",
    "--model.ffn_dim=64",
    "--model.moe.ffn_dim=32",
    "--model.moe.backend=grouped",  # torch._grouped_mm: no host sync (the per-expert loop syncs once per GEMM)
    "--data.seq_len=32",
    "--data.micro_batch_size=2",
    "--train.zero_stage=1",
    "--train.eval_batches=1",
]


@pytest.mark.distributed
def test_bench_layouts_tiny_form(tmp_path):
    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=20, val_fraction=0.2)
    cmd = [
        sys.executable,
        "scripts/bench_layouts.py",
        "--config",
        "configs/train/tiny-moe-cpu.yaml",
        "--layouts",
        "dp2,ep2,ep2_a2a",
        "--steps",
        "4",
        "--warmup",
        "2",
        "--out-dir",
        str(tmp_path / "runs"),
        f"--data.dir={tmp_path / 'data'}",
        *TINY,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=worker_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {
        m[0]: m[1:]
        for m in re.findall(
            r"^\| (\w+) \| 2 \| no \| ([\d,]+) \| ([\d.]+)x \| [\d.]+ \| (\d+) \| [\d.]+ \| ([\d.]+) \| 128 \| "
            r"n/a \| n/a \|$",
            proc.stdout,
            re.MULTILINE,
        )
    }
    assert set(rows) == {"dp2", "ep2", "ep2_a2a"}, proc.stdout
    assert not list((tmp_path / "runs").glob("*/checkpoints/*")), "a throughput run writes no checkpoint"
    assert rows["dp2"][1] == "1.00"
    assert all(float(row[3]) > 0 for row in rows.values()), proc.stdout  # the optimizer step was timed
    # tiny-moe's 2 MoE layers: the all-to-all adds one split-size exchange each, the all-gather ("auto" for ep2) none
    assert int(rows["ep2"][2]) == int(rows["dp2"][2]), proc.stdout
    assert int(rows["ep2_a2a"][2]) == int(rows["dp2"][2]) + 2, proc.stdout
    # --report reads the runs back with the steps and warm-up they ran with, whatever its own flags say
    report = subprocess.run(
        [*cmd[: cmd.index("--steps")], "--out-dir", str(tmp_path / "runs"), "--report"],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert "steps 4 (median of the last 2)" in report.stdout, report.stdout
    table = lambda out: [line for line in out.splitlines() if line.startswith(("| dp2 ", "| ep2"))]  # noqa: E731
    assert table(report.stdout) == table(proc.stdout), report.stdout


bench_layouts = script("bench_layouts")


@pytest.mark.parametrize("name", list(bench_layouts.LAYOUTS))
def test_every_layout_is_a_run_config_of_its_gpu_count(name):
    """Also under the flags one passes for every layout (the layout's own keys win: pipeline layouts compile without
    CUDA graphs)."""
    from moeformer.training.config import load_config

    gpus, keys = bench_layouts.LAYOUTS[name]
    every = {"train.compile": True, "train.compile_mode": "reduce-overhead"}
    config = load_config(REPO / "configs/train/medium-moe-gpu.yaml", {**every, **keys})
    parallel = config.parallel.resolve(gpus)  # raises when the sizes do not fit the GPU count
    parallel.validate_model(config.model_config())
    assert parallel.dp * parallel.tp * parallel.pp == gpus


def test_a_layout_directory_is_replaced_only_when_this_script_made_it(tmp_path):
    fresh_layout_dir = bench_layouts.fresh_layout_dir
    mine, foreign = tmp_path / "dp2", tmp_path / "ep2"
    fresh_layout_dir(mine)
    (mine / "metrics.jsonl").write_text("{}\n")
    fresh_layout_dir(mine)  # an earlier run of this script: replaced
    assert not (mine / "metrics.jsonl").exists()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="ep2 exists and was not made by bench_layouts.py"):
        fresh_layout_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def _finished_run(out, tokens_per_s: float, optimizer_ms: float = 1.0, peak_gib: float = 1.0) -> None:
    """A layout directory as a finished worker of --steps 3 --warmup 1 leaves it: bench.json, metrics.jsonl (steps 2
    and 3, the timed ones, at `tokens_per_s`; step 1 far slower) and the resolved config."""
    out.mkdir(parents=True)
    (out / "bench.json").write_text(
        json.dumps({"steps": 3, "warmup": 1, "host_syncs": 5, "optimizer_ms": optimizer_ms})
    )
    records = [
        {"split": "train", "step": i, "tokens": 1024 * i, "tokens_per_s": t, "peak_mem_gib": peak_gib}
        for i, t in ((1, 1.0), (2, tokens_per_s), (3, tokens_per_s))
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "config.yaml").write_text("train:\n  compile: true\n")


def _report(out_dir, layouts: str, repeat: int) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """`bench_layouts.py --report --repeat <repeat>` over out_dir's runs, and its table's cells by layout."""
    proc = subprocess.run(
        [sys.executable, "scripts/bench_layouts.py", "--config", "configs/train/medium-moe-gpu.yaml", "--layouts",
         layouts, "--out-dir", str(out_dir), "--report", "--repeat", str(repeat)],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    return proc, {row[0]: row for row in rows}


def test_repeated_rounds_give_medians_and_each_round_against_its_own_peer(tmp_path):
    runs = {"one": [50, 100, 150], "dp2": [100, 200, 300], "ep2": [95, 150, 290]}
    for r in range(3):
        for name, tokens in runs.items():
            _finished_run(tmp_path / f"round{r + 1}" / name, tokens[r], optimizer_ms=10.0 + r, peak_gib=3.0 - r)
    proc, rows = _report(tmp_path, "one,dp2,ep2", 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # columns: 3 tokens/s, 4 vs dp, 5 peak GiB, 6 host syncs, 8 optimizer ms, 10 scaling vs one GPU
    assert [rows[n][3] for n in runs] == ["100", "200", "150"], proc.stdout  # medians over the rounds
    # ep2 / dp2 of each round: 0.95, 0.75, 0.97 -> 0.95 (the ratio of the medians would say 0.75)
    assert rows["ep2"][4] == "0.95x" and rows["ep2"][10] == "0.95", proc.stdout
    assert rows["dp2"][4] == "1.00x" and rows["dp2"][10] == "1.00" and rows["one"][4] == "1.00x", proc.stdout
    assert rows["ep2"][5] == "3.0" and rows["ep2"][6] == "5" and rows["ep2"][8] == "11.0", proc.stdout
    assert "  ep2: 95 / 150 / 290" in proc.stdout, proc.stdout  # each round's tokens/s, in round order
    assert "3 rounds: tokens/s, vs dp and scaling are medians over the rounds" in proc.stdout


def test_a_layout_failed_in_any_round_is_reported_failed(tmp_path):
    for r in (1, 2):
        _finished_run(tmp_path / f"round{r}" / "dp2", 100.0)
    _finished_run(tmp_path / "round1" / "ep2", 90.0)  # round 2's ep2 did not finish
    proc, _ = _report(tmp_path, "dp2,ep2", 2)
    assert proc.returncode == 1
    assert f"| ep2 | 2 | | failed: see {tmp_path / 'round2' / 'ep2.log'} |" in proc.stdout, proc.stdout
    assert "| dp2 | 2 | yes | 100 | 1.00x |" in proc.stdout, proc.stdout


@pytest.mark.distributed
def test_bench_layouts_four_rank_tiny_form(tmp_path):
    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=20, val_fraction=0.2)
    cmd = [sys.executable, "scripts/bench_layouts.py", "--config", "configs/train/tiny-moe-cpu.yaml", "--layouts"]
    proc = subprocess.run(
        [*cmd, "one,dp4,ep4", "--steps", "3", "--warmup", "1", "--out-dir", str(tmp_path / "runs")]
        + [f"--data.dir={tmp_path / 'data'}", *TINY],
        cwd=REPO, env=worker_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = r"^\| (\w+) \| [124] \| no \| [\d,]+ \| ([\d.]+x) \| .* \| ([\d.]+) \| n/a \|$"  # vs dp, scaling vs one
    rows = {m[0]: m[1:] for m in re.findall(row, proc.stdout, re.MULTILINE)}
    assert set(rows) == {"one", "dp4", "ep4"}, proc.stdout
    assert rows["one"] == ("1.00x", "1.00") and rows["dp4"][0] == "1.00x", proc.stdout  # each against its own peer


def run_on_two_cpu_ranks(script: str, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 <script> <args>` on CPU (gloo); fails the test unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *args],
        cwd=REPO,
        env=worker_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_bench_moe_expert_parallel_tiny_form():
    proc = run_on_two_cpu_ranks(
        "scripts/bench_moe.py", "--ep", "2", "--ep-chunks", "1,2", "--shapes", "tiny", "--skip", "compile"
    )
    assert "| one GPU, unsharded |" in proc.stdout, proc.stdout
    for chunks in (1, 2):  # tiny: 4 experts per rank
        assert f"| ep=2, all-to-all, {chunks} block(s) (eager) |" in proc.stdout, proc.stdout

    def syncs(label: str) -> int:
        return int(next(line for line in proc.stdout.splitlines() if f"| {label} |" in line).split("|")[-2])

    # the all-gather dispatcher adds no host sync to the layer's own (on CPU: the reference GEMM loop's)
    assert syncs("ep=2, all-gather (eager)") == syncs("one GPU, unsharded"), proc.stdout


@pytest.mark.distributed
def test_bench_collectives_tiny_form():
    proc = run_on_two_cpu_ranks("scripts/bench_collectives.py", "--rows", "4", "--dim", "8", "--calls", "2")
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| .+ \| 4 \| [\d.]+ \| [\d.]+ \|$", line)]
    assert len(rows) == 5, proc.stdout
