"""Tokenizers, corpus preparation, packed windows and rank-sharded resumable batches (CPU, real stdlib text)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moeformer.training.data import (
    DataLoaderState,
    ShardedBatches,
    TokenDataset,
    find_stdlib_sources,
    load_meta,
    prepare_corpus,
    read_source,
    split_files,
    stdlib_root,
    token_dtype,
    write_tokens,
)
from moeformer.training.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from tests.workers import script

N_FILES = 30


@functools.cache
def modest_sources() -> list[str]:
    """Stdlib sources of 1 to 40 kB, in sorted path order."""
    texts = (read_source(stdlib_root() / p) for p in find_stdlib_sources())
    return [t for t in texts if 1000 < len(t) < 40_000]


def stdlib_texts(n: int, skip: int = 0) -> list[str]:
    return modest_sources()[skip : skip + n]


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("byte")
    script("prepare_data").main(["--out", str(out), "--max-files", str(N_FILES)])
    return out


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_stdlib_text():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (258, 256, 257)
    non_ascii = next(t for t in modest_sources() if not t.isascii())
    for text in stdlib_texts(3) + [non_ascii]:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
        assert tok.decode(ids) == text
    # specials are dropped, a cut multi-byte character becomes U+FFFD, ids outside the vocabulary are rejected
    assert tok.decode([tok.bos_id, *tok.encode("déf"), tok.eos_id]) == "déf"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([258])


def test_bpe_trains_on_stdlib_and_round_trips(tmp_path):
    tok = BPETokenizer.train(stdlib_texts(4), vocab_size=512)
    assert tok.vocab_size == 512 and {tok.eos_id, tok.bos_id} == {0, 1}
    unseen = stdlib_texts(2, skip=4)
    for text in unseen + ["héllo wörld 日本 <|eos|> \t\n"]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.bos_id not in ids  # special strings in text stay ordinary text
        assert tok.decode(ids) == text
    assert len(tok.encode(unseen[0])) < 0.8 * len(unseen[0].encode("utf-8"))  # merges learned something
    assert tok.decode([tok.eos_id, *tok.encode("x = 1")]) == "x = 1"

    for name, content in tok.artifacts().items():
        (tmp_path / name).write_bytes(content)
    reloaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert reloaded.encode(unseen[1]) == tok.encode(unseen[1])
    assert reloaded.vocab_size == tok.vocab_size and reloaded.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        BPETokenizer.train(stdlib_texts(1), vocab_size=258)


# ---------------------------------------------------------------------------------------------------- preparation


def test_token_dtype_boundaries():
    assert token_dtype(258) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_split_is_by_file_deterministic_and_never_empty():
    paths = find_stdlib_sources()
    files = split_files(paths, 0.1)
    assert set(files["train"]).isdisjoint(files["val"]) and sorted(files["train"] + files["val"]) == sorted(paths)
    assert 0.05 < len(files["val"]) / len(paths) < 0.15
    assert split_files(paths[:500], 0.1)["val"] == [p for p in files["val"] if p in set(paths[:500])]
    tiny = split_files(paths[:3], 0.01)
    assert len(tiny["val"]) == 1 and len(tiny["train"]) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(paths, 0.0)


def test_prepare_byte_corpus(byte_dir, tmp_path):
    meta = load_meta(byte_dir)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["dtype"]) == ("byte", 258, 256, "uint16")
    root = Path(meta["source"]["root"])
    first = find_stdlib_sources()[:N_FILES]
    kept = [p for p in first if read_source(root / p).strip()]
    train, val = meta["splits"]["train"]["files"], meta["splits"]["val"]["files"]
    assert set(train).isdisjoint(val) and sorted(train + val) == kept and len(val) >= 1
    assert meta["source"]["files_skipped_empty"] == len(first) - len(kept)

    for split, files in (("train", train), ("val", val)):
        tokens = np.fromfile(byte_dir / f"{split}.bin", dtype=np.uint16)
        info = meta["splits"][split]
        assert info["tokens"] == len(tokens) == sum(len(read_source(root / p).encode("utf-8")) + 1 for p in files)
        assert info["documents"] == len(files) == int((tokens == 256).sum()) and tokens[-1] == 256
        docs = np.split(tokens, np.flatnonzero(tokens == 256)[:-1] + 1)
        assert ByteTokenizer().decode(docs[-1].tolist()) == read_source(root / files[-1])

    again = tmp_path / "again"
    prepare_corpus(again, max_files=N_FILES)
    assert dir_bytes(again) == dir_bytes(byte_dir)
    assert isinstance(load_tokenizer(byte_dir), ByteTokenizer)


def test_prepare_bpe_corpus(tmp_path):
    meta = prepare_corpus(tmp_path, tokenizer="bpe", vocab_size=400, max_files=12)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, BPETokenizer) and meta["vocab_size"] == tok.vocab_size == 400
    assert meta["eos_id"] == tok.eos_id and meta["dtype"] == "uint16"
    tokens = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    first_doc = tokens[: np.flatnonzero(tokens == tok.eos_id)[0]]
    assert tok.decode(first_doc.tolist()) == read_source(stdlib_root() / meta["splits"]["train"]["files"][0])

    broken = json.loads((tmp_path / "meta.json").read_text()) | {"vocab_size": 401}
    (tmp_path / "meta.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(tmp_path)


def test_prepare_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare_corpus(tmp_path, tokenizer="wordpiece")
    with pytest.raises(ValueError, match="fixed at 258"):
        prepare_corpus(tmp_path, tokenizer="byte", vocab_size=512)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        load_meta(tmp_path)


# ---------------------------------------------------------------------------------------------------- windows


def make_dataset(tmp_path: Path, tokens: list[int] | np.ndarray, seq_len: int, eos_id: int = 256) -> TokenDataset:
    write_tokens(tmp_path / "tokens.bin", [np.asarray(tokens)], np.dtype(np.uint32))
    return TokenDataset(tmp_path / "tokens.bin", seq_len, "uint32", eos_id=eos_id)


def test_windows_shift_and_mark_documents(tmp_path):
    E = 256
    ds = make_dataset(tmp_path, [1, 2, 3, E, 4, 5, E, 6, 7, 8, 9, E, 10, 11], seq_len=4)
    assert len(ds) == 3
    batch = ds.get_batch([0, 1, 2])
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3, E], [4, 5, E, 6], [7, 8, 9, E]]
    assert batch["targets"].tolist() == [[2, 3, E, 4], [5, E, 6, 7], [8, 9, E, 10]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 0]]

    starts_with_eos = make_dataset(tmp_path, [E, 1, E, E, 2], seq_len=4).get_batch([0])
    assert starts_with_eos["document_ids"].tolist() == [[0, 0, 1, 2]]
    assert starts_with_eos["position_ids"].tolist() == [[0, 1, 0, 0]]


def test_windows_match_reference_on_real_corpus(byte_dir):
    seq_len = 64
    ds = TokenDataset(byte_dir / "train.bin", seq_len)  # dtype and eos_id from meta.json
    tokens = np.fromfile(byte_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    eos_windows = [i for i in range(len(ds)) if 256 in tokens[i * seq_len : i * seq_len + seq_len]]
    indices = eos_windows[:6] + [0, len(ds) - 1]
    batch = ds.get_batch(indices)
    for row, i in enumerate(indices):
        window = tokens[i * seq_len : i * seq_len + seq_len + 1]
        doc, pos, doc_ids, pos_ids = 0, 0, [], []
        for t, token in enumerate(window[:-1]):
            if token == 256 and t > 0:
                doc, pos = doc + 1, 0
            doc_ids.append(doc)
            pos_ids.append(pos)
            pos += 1
        assert batch["input_ids"][row].tolist() == window[:-1].tolist()
        assert batch["targets"][row].tolist() == window[1:].tolist()
        assert batch["document_ids"][row].tolist() == doc_ids
        assert batch["position_ids"][row].tolist() == pos_ids
    assert len(eos_windows) >= 6


def test_dataset_rejects_bad_input(tmp_path, byte_dir):
    ds = make_dataset(tmp_path, np.arange(20), seq_len=4)
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenDataset(tmp_path / "tokens.bin", 20, "uint32", eos_id=256)
    with pytest.raises(ValueError, match="whole number"):
        TokenDataset(
            byte_dir / "train.bin", 4, "uint32" if (byte_dir / "train.bin").stat().st_size % 4 else "uint64", eos_id=256
        )
    with pytest.raises(ValueError, match="unknown split"):
        TokenDataset.from_dir(byte_dir, "test", 8)
    assert len(TokenDataset.from_dir(byte_dir, "val", 8)) > 0


# ---------------------------------------------------------------------------------------------------- batches


@pytest.fixture
def counting_dataset(tmp_path) -> TokenDataset:
    """100 windows of 4 tokens whose first input identifies the window (token i*4), with no eos."""
    return make_dataset(tmp_path, np.arange(401), seq_len=4, eos_id=10**6)


def window_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] // 4).tolist()


def take(batches: ShardedBatches, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(batches)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world_size, batch_size", [(2, 3), (4, 1), (3, 2)])
def test_ranks_together_see_what_one_rank_sees(counting_dataset, world_size, batch_size):
    n = 40  # crosses epoch boundaries
    single = take(ShardedBatches(counting_dataset, batch_size * world_size, seed=3), n)
    ranks = [take(ShardedBatches(counting_dataset, batch_size, r, world_size, seed=3), n) for r in range(world_size)]
    for step in range(n):
        for key in single[step]:
            assert torch.equal(torch.cat([rank[step][key] for rank in ranks]), single[step][key])

    per_epoch = len(counting_dataset) // (batch_size * world_size)
    first_epoch = [w for rank in ranks for batch in rank[:per_epoch] for w in window_ids(batch)]
    assert len(set(first_epoch)) == len(first_epoch) == per_epoch * batch_size * world_size
    second_epoch = [w for batch in single[per_epoch : 2 * per_epoch] for w in window_ids(batch)]
    assert second_epoch != [w for batch in single[:per_epoch] for w in window_ids(batch)]


def test_order_depends_on_seed_only(counting_dataset):
    first = [window_ids(b) for b in take(ShardedBatches(counting_dataset, 4, seed=1), 5)]
    assert first == [window_ids(b) for b in take(ShardedBatches(counting_dataset, 4, seed=1), 5)]
    assert first != [window_ids(b) for b in take(ShardedBatches(counting_dataset, 4, seed=2), 5)]


@pytest.mark.parametrize("k, state", [(0, (0, 0)), (5, (0, 5)), (16, (0, 16)), (21, (1, 5))])  # 16 batches/epoch
def test_resume_is_exact(counting_dataset, k, state):
    running = ShardedBatches(counting_dataset, 3, rank=1, world_size=2, seed=7)
    it = iter(running)
    for _ in range(k):
        next(it)
    saved = json.loads(json.dumps(running.state_dict()))
    expected = [next(it) for _ in range(6)]

    resumed = ShardedBatches(counting_dataset, 3, rank=1, world_size=2, seed=7, state=saved)
    reloaded = ShardedBatches(counting_dataset, 3, rank=1, world_size=2, seed=7)
    reloaded.load_state_dict(saved)
    for other in (resumed, reloaded):
        for want, got in zip(expected, take(other, 6), strict=True):
            assert all(torch.equal(want[key], got[key]) for key in want)
    assert DataLoaderState.from_dict(saved) == DataLoaderState(*state)


@pytest.mark.parametrize("k", [0, 5, 16, 21])  # 16 batches/epoch: the second epoch's order is another permutation
def test_seek_continues_the_stream_where_k_batches_left_it(counting_dataset, k):
    """`seek(k)` (data.start_batch) gives the batches that follow the first k, e.g. those a run that drew k did not."""
    stream = take(ShardedBatches(counting_dataset, 3, rank=1, world_size=2, seed=7), k + 6)
    sought = ShardedBatches(counting_dataset, 3, rank=1, world_size=2, seed=7)
    sought.seek(k)
    for want, got in zip(stream[k:], take(sought, 6), strict=True):
        assert all(torch.equal(want[key], got[key]) for key in want)


def test_eval_pass_is_one_ordered_epoch(counting_dataset):
    batches = list(ShardedBatches(counting_dataset, 8, rank=1, world_size=2, shuffle=False, loop=False))
    assert len(batches) == 100 // 16
    assert window_ids(batches[0]) == list(range(8, 16)) and window_ids(batches[1]) == list(range(24, 32))


def test_sharded_batches_reject_bad_input(counting_dataset):
    with pytest.raises(ValueError, match="rank"):
        ShardedBatches(counting_dataset, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(counting_dataset, 60, rank=0, world_size=2)
    with pytest.raises(KeyError, match="exactly the keys"):
        ShardedBatches(counting_dataset, 2, state={"epoch": 0, "index": 0, "step": 3})
    with pytest.raises(ValueError, match="does not fit"):
        ShardedBatches(counting_dataset, 2, state={"epoch": 0, "index": 51})
