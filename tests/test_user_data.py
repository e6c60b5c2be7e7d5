"""A corpus from the user's files: text, JSON lines and parquet give exactly the tokens the tokenizer gives each
document, split by document; instruction data masks the prompt's targets; bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moeformer.layers.lm_head import IGNORE_INDEX
from moeformer.models import ModelConfig, build_model
from moeformer.training.data import TokenDataset, load_meta
from moeformer.training.tokenizer import PretrainedTokenizer, load_tokenizer
from moeformer.training.user_data import document_split, expand_files, prepare_user_data
from tests.test_scripts import script

tokenizers = pytest.importorskip("tokenizers")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

EOS = "</s>"


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Paragraphs of a standard-library source: text every machine has, of varied lengths."""
    source = Path(json.__file__).read_text()
    paragraphs = [p for p in source.split("\n\n") if p.strip()]
    return paragraphs[:40]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, documents) -> Path:
    """A byte-level BPE tokenizer.json trained here, with its eos named in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(documents, trainer=trainer)
    directory = tmp_path_factory.mktemp("tok")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return directory


def direct_tokens(tokenizer_dir: Path, text: str) -> list[int]:
    """What the tokenizers library itself gives for `text` (no special tokens)."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def expected_splits(tokenizer_dir, docs_by_file: list[tuple[Path, list[str]]], val_fraction=0.25, seed=0):
    eos = direct_tokens(tokenizer_dir, EOS)
    out = {"train": [], "val": []}
    for path, docs in docs_by_file:
        for index, doc in enumerate(docs):
            out[document_split(seed, path, index, val_fraction)] += direct_tokens(tokenizer_dir, doc) + eos
    return out


def read_split(out: Path, split: str) -> list[int]:
    meta = load_meta(out)
    return np.fromfile(out / meta["splits"][split]["file"], dtype=meta["dtype"]).tolist()


@pytest.mark.parametrize("fmt", ["jsonl", "text", "parquet"])
def test_files_give_the_tokenizers_tokens(tmp_path, documents, tokenizer_dir, fmt):
    src = tmp_path / "src"
    src.mkdir()
    if fmt == "jsonl":
        halves = [documents[:25], documents[25:]]
        files = [src / "a.jsonl", src / "b.jsonl"]
        for path, docs in zip(files, halves):
            path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
        by_file = list(zip(files, halves))
    elif fmt == "text":
        files = [src / f"doc{i:02d}.txt" for i in range(len(documents))]
        for path, doc in zip(files, documents):
            path.write_text(doc)
        by_file = [(path, [doc]) for path, doc in zip(files, documents)]
    else:
        files = [src / "a.parquet"]
        pq.write_table(pa.table({"body": documents, "n": list(range(len(documents)))}), files[0], row_group_size=7)
        by_file = [(files[0], documents)]
    tokenizer = PretrainedTokenizer(tokenizer_dir)
    field = "body" if fmt == "parquet" else "text"
    meta = prepare_user_data(
        tmp_path / "out",
        [str(src / f"*.{ {'text': 'txt'}.get(fmt, fmt) }")],
        fmt,
        tokenizer,
        text_field=field,
        val_fraction=0.25,
        workers=2 if fmt == "jsonl" else 1,
        progress=False,
    )
    want = expected_splits(tokenizer_dir, by_file)
    assert want["train"] and want["val"]
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split) == want[split]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(documents)
    assert meta["tokenizer_sha256"]["tokenizer.json"]
    rebuilt = load_tokenizer(tmp_path / "out")  # the data directory carries its tokenizer
    assert rebuilt.eos_id == direct_tokens(tokenizer_dir, EOS)[0] and rebuilt.vocab_size == tokenizer.vocab_size


def test_instruction_data_masks_the_prompt_and_the_loss_counts_responses_only(tmp_path, tokenizer_dir):
    pairs = [(f"Q{i}: what is {i} + {i}? ", f"A: {2 * i}, since {i} and {i} make {2 * i}.") for i in range(30)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    prepare_user_data(
        tmp_path / "out",
        [str(path)],
        "jsonl",
        PretrainedTokenizer(tokenizer_dir),
        prompt_field="prompt",
        response_field="response",
        val_fraction=0.2,
        progress=False,
    )
    eos = direct_tokens(tokenizer_dir, EOS)
    tokens, masks = [], []
    for index, (prompt, response) in enumerate(pairs):
        if document_split(0, path, index, 0.2) == "train":
            p, r = direct_tokens(tokenizer_dir, prompt), direct_tokens(tokenizer_dir, response)
            tokens += p + r + eos
            masks += [0] * len(p) + [1] * (len(r) + 1)
    assert read_split(tmp_path / "out", "train") == tokens

    dataset = TokenDataset.from_dir(tmp_path / "out", "train", seq_len=32)
    batch = dataset.get_batch([0, 1])
    starts = np.array([0, 32])[:, None] + np.arange(1, 33)
    target_mask = torch.from_numpy(np.array(masks)[starts])
    assert torch.equal(batch["targets"] == IGNORE_INDEX, target_mask == 0)
    assert torch.equal(
        batch["targets"][target_mask == 1], torch.tensor(tokens)[torch.from_numpy(starts)][target_mask == 1]
    )

    # the training loss is cross-entropy over the response targets alone, by hand
    config = ModelConfig.from_name("tiny-dense", n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=300)
    model = build_model(config).eval()
    with torch.no_grad():
        loss = model(batch["input_ids"], targets=batch["targets"]).loss
        logits = model(batch["input_ids"]).logits.float()
    counted = target_mask == 1
    hand = torch.nn.functional.cross_entropy(logits[counted], batch["targets"][counted])
    assert torch.allclose(loss, hand, rtol=1e-5)


def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, tokenizer_dir, capsys):
    tokenizer = PretrainedTokenizer(tokenizer_dir)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: field 'text' is missing"):
        prepare_user_data(tmp_path / "o1", [str(tmp_path / "missing.jsonl")], "jsonl", tokenizer, progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        prepare_user_data(tmp_path / "o2", [str(tmp_path / "broken.jsonl")], "jsonl", tokenizer, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8"):
        prepare_user_data(tmp_path / "o3", [str(tmp_path / "latin1.txt")], "text", tokenizer, progress=False)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet is not a readable parquet file"):
        prepare_user_data(tmp_path / "o4", [str(tmp_path / "fake.parquet")], "parquet", tokenizer, progress=False)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols\.parquet: no column 'text'"):
        prepare_user_data(tmp_path / "o5", [str(tmp_path / "cols.parquet")], "parquet", tokenizer, progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_files([str(tmp_path / "nothing*.txt")])
    assert not any((tmp_path / f"o{i}" / "meta.json").exists() for i in range(1, 6))  # nothing half-written

    with pytest.raises(SystemExit) as exit_info:  # the script: one line, exit status 1
        script("prepare_data").main(
            [
                "--files",
                str(tmp_path / "missing.jsonl"),
                "--format",
                "jsonl",
                "--tokenizer",
                str(tokenizer_dir),
                "--out",
                str(tmp_path / "o6"),
                "--workers",
                "1",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()  # (above it, the progress bar)
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ") and "missing.jsonl:2" in err


def test_a_tokenizer_without_an_eos_asks_for_one(tmp_path, tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="--eos-token"):
        PretrainedTokenizer(tmp_path / "tokenizer.json")
    assert (
        PretrainedTokenizer(tmp_path / "tokenizer.json", eos_token=EOS).eos_id == direct_tokens(tokenizer_dir, EOS)[0]
    )


def test_tokenizer_files_travel_only_from_inside_their_directory(tmp_path, tokenizer_dir):
    from moeformer.training.tokenizer import copy_tokenizer_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (tmp_path / "secret").write_text("not a tokenizer")
    (src / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").symlink_to(src / "tokenizer.json")  # inside: followed
    (src / "meta.json").symlink_to(tmp_path / "secret")  # outside: never read
    assert copy_tokenizer_files(src, dst) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
