"""`model.init_from`: a run starts from a Hugging Face checkpoint that transformers wrote, the model section taken
from the checkpoint, and its first cross-entropy is transformers' own on the same batches, on one rank and on two
(ZeRO-3, expert parallel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeformer.errors import ConfigError
from moeformer.models.checkpoint import read_model_config
from moeformer.training.config import load_config
from moeformer.training.data import ShardedBatches, TokenDataset, prepare_corpus
from tests.workers import REPO, worker_env

transformers = pytest.importorskip("transformers")

SEQ, MICRO = 32, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Mixtral written by transformers, with the byte tokenizer's vocabulary; a byte corpus)."""
    root = tmp_path_factory.mktemp("init_from")
    config = transformers.MixtralConfig(
        vocab_size=258,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # norms away from one, so a misplaced tensor shows in the loss
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    prepare_corpus(root / "data", tokenizer="byte", max_files=10, val_fraction=0.3)
    return root / "hf", root / "data"


def overrides(run: Path, hf: Path, data: Path, **extra) -> dict:
    return {
        "out_dir": str(run),
        "data.dir": str(data),
        "data.seq_len": SEQ,
        "data.micro_batch_size": MICRO,
        "data.packed_documents": False,
        "train.steps": 1,
        "train.dtype": "fp32",
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.progress_bar": False,
        "checkpoint.export": "none",
        "model.init_from": str(hf),
        **extra,
    }


def test_model_section_comes_from_the_checkpoint(setup, tmp_path):
    hf, data = setup
    config = load_config(None, overrides(tmp_path, hf, data, **{"model.moe.aux_loss_coef": 0.0}))
    want = read_model_config(hf)
    got = config.model_config()
    assert got.dim == want.dim == 32 and got.moe.num_experts == 4 and got.n_kv_heads == 2
    assert got.moe.aux_loss_coef == 0.0  # an override that keeps every shape applies
    with pytest.raises(ConfigError, match=r"model.init_from .* change the checkpoint's tensors"):
        load_config(None, overrides(tmp_path, hf, data, **{"model.moe.num_experts": 8}))


def transformers_loss(hf: Path, config, world: int) -> float:
    """transformers' next-token cross-entropy on the first batch of each data-parallel rank, averaged."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    d = config.data
    losses = []
    for rank in range(world):
        batches = ShardedBatches(
            TokenDataset.from_dir(d.dir, "train", d.seq_len),
            d.micro_batch_size,
            rank,
            world,
            seed=config.train.seed,
            shuffle=d.shuffle,
        )
        batch = next(iter(batches))
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()).item())
    return sum(losses) / world


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc,layout",
    [(1, {"train.zero_stage": 0}), (2, {"train.zero_stage": 3}), (2, {"train.zero_stage": 1, "parallel.ep": 2})],
    ids=["one-rank-zero0", "two-ranks-zero3", "two-ranks-ep2"],
)
def test_first_loss_is_transformers_loss_on_the_same_batches(setup, tmp_path, nproc, layout):
    hf, data = setup
    settings = overrides(tmp_path / "run", hf, data, **layout)
    flags = [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in settings.items()]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        [*(launcher if nproc > 1 else [sys.executable]), str(REPO / "scripts" / "train.py"), *flags],
        capture_output=True,
        text=True,
        env=worker_env(OMP_NUM_THREADS="1"),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and r.get("split") == "train")
    want = transformers_loss(hf, load_config(None, settings), nproc)
    # fp32, the same weights and tokens; the forwards differ in summation order only
    assert abs(first["ce_loss"] - want) <= 1e-4 * want
