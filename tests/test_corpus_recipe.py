"""A pinned code corpus from wheels: the same tokens and hashes on every build, the documents the recipe names (too
large, blank and duplicate files left out), one clear error for a missing or altered wheel; the shipped recipe's
parts each fit one upload."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from moeformer.training.config import load_config
from moeformer.training.corpus_recipe import (
    MIB,
    corpus_order,
    load_recipe,
    locate_wheels,
    prepare_recipe,
    select_files,
)
from moeformer.training.data import ShardedBatches, TokenDataset, epoch_steps, load_meta
from moeformer.training.tokenizer import ByteTokenizer, load_tokenizer
from moeformer.training.user_data import document_split
from tests.test_scripts import script

pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(yaml.__file__).read_text()  # Python source every machine with this package has
MEMBERS = {
    "alpha-1.0-py3-none-any.whl": {
        "alpha/__init__.py": "",  # blank: left out
        "alpha/core.py": SOURCE[:3000],
        "alpha/util.py": SOURCE[3000:5000],
        "alpha/table.py": "x = 1\n" * 1000,  # 6000 bytes: over max_file_bytes
        "alpha/data.json": "{}",  # not a source file
        "alpha-1.0.dist-info/METADATA": "Name: alpha\n",
    },
    "beta-2.0-py3-none-any.whl": {
        "beta/__init__.py": "from beta.main import run\n",
        "beta/main.py": SOURCE[5000:7000],
        "beta/vendored/util.py": SOURCE[3000:5000],  # a copy of alpha/util.py: left out
        "beta/tests/test_main.py": SOURCE[7000:8000],
    },
}
SEED = 4  # a seed that gives both splits a document
KEPT = [
    "alpha-1.0-py3-none-any.whl/alpha/core.py",
    "alpha-1.0-py3-none-any.whl/alpha/util.py",
    "beta-2.0-py3-none-any.whl/beta/__init__.py",
    "beta-2.0-py3-none-any.whl/beta/main.py",
    "beta-2.0-py3-none-any.whl/beta/tests/test_main.py",
]


def make_wheels(directory: Path) -> dict[str, Path]:
    """The two wheels of MEMBERS, written with fixed timestamps (so their bytes, hence sha256, are stable)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for wheel, members in MEMBERS.items():
        paths[wheel] = directory / wheel
        with zipfile.ZipFile(paths[wheel], "w", zipfile.ZIP_DEFLATED) as archive:
            for name in reversed(list(members)):  # stored out of order: the corpus sorts
                archive.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), members[name])
    return paths


def write_recipe(path: Path, wheels: dict[str, Path], **changes) -> Path:
    spec = {
        "name": "tiny-code",
        "seed": SEED,
        "val_fraction": 0.4,
        "max_file_bytes": 5000,
        "part_max_mib": 1,
        "tokenizer": {"vocab_size": 300, "sample_bytes": 4000},
        "wheels": [
            {
                "file": name,
                "part": part,
                "bytes": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
            for (name, p), part in zip(wheels.items(), "ab")
        ],
        **changes,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", make_wheels(tmp_path / "wheels"))


def read_split(out: Path, split: str) -> np.ndarray:
    meta = load_meta(out)
    return np.fromfile(out / meta["splits"][split]["file"], dtype=meta["dtype"])


def test_recipe_gives_the_named_documents_in_order(tmp_path, recipe):
    """The kept files (too large, blank, duplicate and non-source members left out), each split in the recipe's
    seeded order, byte for byte."""
    meta = prepare_recipe(tmp_path / "out", recipe, [tmp_path / "wheels"], ByteTokenizer(), progress=False)
    text = {f"{w}/{m}": content for w, members in MEMBERS.items() for m, content in members.items()}
    spec = load_recipe(recipe)
    order = corpus_order(spec, select_files(spec, locate_wheels(spec, [tmp_path / "wheels"])))
    assert sorted(order) == KEPT
    expected = {"train": b"", "val": b""}
    for name in order:
        expected[document_split(SEED, Path(name), 0, 0.4)] += text[name].encode() + b"\x00"
    assert expected["train"] and expected["val"], "the test's seed must give both splits a document"
    eos = ByteTokenizer.eos_id
    for split in ("train", "val"):
        ids = read_split(tmp_path / "out", split)
        assert ids.tolist() == [eos if b == 0 else b for b in expected[split]]
    source = meta["source"]
    assert source["files"] == len(KEPT) and source["bytes"] == sum(len(text[n].encode()) for n in KEPT)
    assert source["file_list_sha256"] == hashlib.sha256("\n".join(KEPT).encode()).hexdigest()
    assert source["excluded"] == {
        "too_large": ["alpha-1.0-py3-none-any.whl/alpha/table.py"],
        "blank": 1,
        "duplicates": 1,
    }
    assert source["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert source["wheels"] == {w["file"]: w["sha256"] for w in yaml.safe_load(recipe.read_text())["wheels"]}


def test_bpe_build_is_deterministic_from_wheels_in_their_parts(tmp_path, recipe):
    """The trained tokenizer, the tokens and the meta are the same whether the wheels lie in one directory or in
    their part directories, and whatever the number of workers."""
    one = prepare_recipe(tmp_path / "one", recipe, [tmp_path / "wheels"], progress=False)
    for wheel, part in zip(MEMBERS, "ab"):
        (tmp_path / "parts" / part).mkdir(parents=True, exist_ok=True)
        (tmp_path / "wheels" / wheel).rename(tmp_path / "parts" / part / wheel)
    two = prepare_recipe(tmp_path / "two", recipe, [tmp_path / "parts"], workers=2, progress=False)
    assert one == two and one["tokenizer"] == "bpe" and one["vocab_size"] == 300
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    tokenizer = load_tokenizer(tmp_path / "one")  # the tokens decode back to the documents
    ids = read_split(tmp_path / "one", "train")
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    decoded = [tokenizer.decode(doc.tolist()) for doc in np.split(ids, ends + 1)[:-1]]
    names = [n.split("/", 1) for n in KEPT if document_split(SEED, Path(n), 0, 0.4) == "train"]
    assert sorted(decoded) == sorted(MEMBERS[wheel][member] for wheel, member in names)


def test_missing_or_altered_wheel_is_one_clear_error(tmp_path, recipe, capsys):
    wheels = tmp_path / "wheels"
    (wheels / "beta-2.0-py3-none-any.whl").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing from .*: beta-2\.0-py3-none-any\.whl; fetch them"):
        prepare_recipe(tmp_path / "o1", recipe, [wheels], ByteTokenizer(), progress=False)
    (wheels / "beta-2.0-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    with pytest.raises(ValueError, match=r"beta-2\.0-py3-none-any\.whl has sha256 [0-9a-f]{64}, the recipe .* pins"):
        prepare_recipe(tmp_path / "o2", recipe, [wheels], ByteTokenizer(), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # checked before anything is written

    with pytest.raises(SystemExit) as exit_info:  # the script: one line, exit status 1
        script("prepare_data").main(["--recipe", str(recipe), "--wheels", str(wheels), "--out", str(tmp_path / "o3")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("error: ") and "beta-2.0-py3-none-any.whl" in err


def test_bad_recipes_are_refused(tmp_path):
    wheels = make_wheels(tmp_path / "wheels")
    with pytest.raises(ValueError, match="over 0"):
        load_recipe(write_recipe(tmp_path / "big.yaml", wheels, part_max_mib=0))
    with pytest.raises(ValueError, match="unknown key 'wheel'"):
        load_recipe(write_recipe(tmp_path / "typo.yaml", wheels, wheel=[]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "absent.yaml")


def test_shipped_recipe_parts_each_fit_one_upload():
    recipe = load_recipe(REPO / "configs/data/code-100m.yaml")
    parts = recipe.parts()
    assert sorted(parts) == ["a", "b"]
    for wheels in parts.values():
        assert sum(w.bytes for w in wheels) <= 60 * MIB
    for wheel in recipe.wheels:  # pure-Python wheels only: the same file on every platform
        assert wheel.file.endswith("-none-any.whl") and len(bytes.fromhex(wheel.sha256)) == 32


@pytest.mark.parametrize("world_size, micro_batch, grad_accum", [(1, 4, 1), (2, 3, 2)])
def test_epoch_steps_see_no_train_window_twice(tmp_path, recipe, world_size, micro_batch, grad_accum):
    """`epoch_steps` (moe_vs_dense --steps epoch) is the most steps whose batches, as every rank draws them, hold
    each train window at most once."""
    out = tmp_path / "out"
    prepare_recipe(out, recipe, [tmp_path / "wheels"], ByteTokenizer(), progress=False)
    steps = epoch_steps(out, 8, micro_batch, grad_accum, world_size)
    dataset = TokenDataset.from_dir(out, "train", 8)
    ranks = [ShardedBatches(dataset, micro_batch, r, world_size, seed=1) for r in range(world_size)]
    seen = [w for r in ranks for i in range(steps * grad_accum) for w in r.batch_indices(0, i).tolist()]
    assert len(seen) == len(set(seen)) == steps * grad_accum * micro_batch * world_size
    assert (steps + 1) * grad_accum > ranks[0].batches_per_epoch  # one more step would start a second epoch


def fake_run(run_dir: Path, name: str, data_dir: Path, steps: int, val_loss: float) -> None:
    """A finished run's config.yaml and metrics.jsonl as the trainer writes them (32 tokens a step)."""
    run_dir.mkdir(parents=True)
    config = REPO / f"configs/train/{name}-gpu.yaml"
    load_config(config, [f"--data.dir={data_dir}", f"--train.steps={steps}"]).save(run_dir / "config.yaml")
    train = [
        {"split": "train", "step": s, "tokens": 32 * s, "ce_loss": 5.0, "tokens_per_s": 1e5, "peak_mem_gib": 1.0}
        for s in range(10, steps + 1, 10)
    ]
    val = [{"split": "val", "step": steps, "loss": val_loss}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train + val))


def test_moe_vs_dense_report_combines_runs_made_apart(tmp_path, recipe, monkeypatch):
    """The report step reads the two runs (trained in separate processes) and states steps, tokens and epochs; runs
    that differ in steps are refused."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # as when the script runs: its plot_run beside it
    data = tmp_path / "data"
    meta = prepare_recipe(data, recipe, [tmp_path / "wheels"], ByteTokenizer(), progress=False)
    fake_run(tmp_path / "runs/small-moe", "small-moe", data, 100, 2.5)
    fake_run(tmp_path / "runs/small-dense", "small-dense", data, 100, 2.6)
    results = script("moe_vs_dense").report(tmp_path / "runs")
    assert [r["final_val_loss"] for r in results] == [2.5, 2.6]
    assert results[0]["steps"] == 100 and results[0]["epochs"] == 3200 / meta["splits"]["train"]["tokens"]
    table = (tmp_path / "runs/results.md").read_text()
    assert "100 steps" in table and f"{meta['splits']['train']['tokens']:,} train tokens; 3,200 seen" in table
    assert (tmp_path / "runs/loss.png").is_file()

    fake_run(tmp_path / "other/small-moe", "small-moe", data, 100, 2.5)
    fake_run(tmp_path / "other/small-dense", "small-dense", data, 90, 2.6)
    with pytest.raises(SystemExit, match="differ in corpus, steps or tokens"):
        script("moe_vs_dense").report(tmp_path / "other")
