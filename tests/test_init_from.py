"""`model.init_from`: a run starts from a Hugging Face checkpoint that transformers wrote, the model section taken
from the checkpoint, and its first cross-entropy is transformers' own on the same batches, on one rank and on two
(ZeRO-3, expert parallel)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from moeformer.errors import ConfigError
from moeformer.models.checkpoint import read_model_config
from moeformer.training.config import load_config
from moeformer.training.data import ShardedBatches, TokenDataset, prepare_corpus
from tests.test_hf_parity import build_hf
from tests.workers import run_train

transformers = pytest.importorskip("transformers")

SEQ, MICRO = 32, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Mixtral written by transformers, with the byte tokenizer's vocabulary; a byte corpus)."""
    root = tmp_path_factory.mktemp("init_from")
    model = build_hf(
        "mixtral",
        dict(
            vocab_size=258,
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=128,
        ),
    )
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


def as_flags(settings: dict) -> list[str]:
    """Dotted settings as scripts/train.py's command-line overrides (values as YAML, strings as they are)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in settings.items()]


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
    proc = run_train(as_flags(settings), nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and r.get("split") == "train")
    want = transformers_loss(hf, load_config(None, settings), nproc)
    # fp32, the same weights and tokens; the forwards differ in summation order only
    assert abs(first["ce_loss"] - want) <= 1e-4 * want


def test_hf_tokenizer_data_trains_and_exports_a_directory_transformers_loads(setup, tmp_path):
    """Data tokenized with the checkpoint's own tokenizer.json: the run starts, and its Hugging Face export holds the
    tokenizer files, loads in transformers as it is and gives our logits; a byte corpus is refused in one line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeformer.models.model import from_pretrained
    from moeformer.training.tokenizer import PretrainedTokenizer
    from moeformer.training.user_data import prepare_user_data

    hf, byte_data = setup
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    for file in hf.iterdir():
        (model_dir / file.name).write_bytes(file.read_bytes())
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=258,
            special_tokens=["</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[i : i + 400]}) + "\n" for t in texts for i in range(0, 4000, 400)))
    prepare_user_data(
        tmp_path / "data", [str(corpus)], "jsonl", PretrainedTokenizer(model_dir), val_fraction=0.3, progress=False
    )

    def train(data: Path, export: str) -> subprocess.CompletedProcess:
        settings = overrides(tmp_path / f"run-{export}", model_dir, data, **{"checkpoint.export": export})
        return run_train(as_flags(settings))

    refused = train(byte_data, "none")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "has its own tokenizer.json, the data" in refused.stderr.strip().splitlines()[-1]

    proc = train(tmp_path / "data", "hf")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    export = tmp_path / "run-hf" / "model"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in export.iterdir()}
    ids = transformers.AutoTokenizer.from_pretrained(export)("def f(x):\n    return x")["input_ids"]
    assert ids == tok.encode("def f(x):\n    return x").ids
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    ours = from_pretrained(export)
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = theirs(x).logits, ours(x).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # fp32, summation order only
