"""Training data: the Python standard library as a tokenized corpus, packed windows over it, rank-sharded batches.

`prepare_corpus` writes `train.bin`/`val.bin` (token ids, each file a document followed by eos) and `meta.json`.
`TokenDataset` reads windows of packed documents from a .bin; `ShardedBatches` iterates them deterministically,
split across ranks, and resumes exactly from a `DataLoaderState`.

Document convention: eos separates documents (GPT-2 style). It is the last target of the document it ends and the
first input of the document it opens, so its position starts the next document: `document_ids` increase and
`position_ids` restart at 0 on every eos input. Every target is thus predictable from its own document's context
and no target is masked, except in instruction data: there a loss mask stored beside the tokens (written by
`moeformer.training.user_data`) turns the prompt's targets into the ignore index.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from moeformer.layers.lm_head import IGNORE_INDEX
from moeformer.training.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer

META_FILE = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKENIZERS = ("byte", "bpe")
DEFAULT_BPE_VOCAB = 4096
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
WRITE_CHUNK_TOKENS = 1 << 22
ENCODE_CHUNK_DOCS = 64


# ---------------------------------------------------------------------------------------------------- the corpus


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_stdlib_sources(root: str | Path | None = None) -> list[str]:
    """Relative paths of all `.py` files under the stdlib (test suites included, installed packages excluded),
    sorted so that the corpus is the same on every run."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    paths = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(p.as_posix() for p in paths if not EXCLUDED_DIRS.intersection(p.parts))


def read_source(path: str | Path) -> str:
    """Text of a Python source file, decoded per its coding cookie (PEP 263); undecodable bytes become U+FFFD."""
    return decode_source(Path(path).read_bytes())


def decode_source(raw: bytes) -> str:
    """`raw` Python source decoded per its coding cookie (PEP 263); undecodable bytes become U+FFFD."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError:  # a deliberately broken cookie (the stdlib's own tests have some)
        encoding = "utf-8"
    return raw.decode(encoding, errors="replace")


def path_hash(rel_path: str) -> float:
    """A stable number in [0, 1) from a relative path; it decides the file's split."""
    return int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big") / 2**64


def split_files(rel_paths: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Split files (not tokens) into train/val: a file is val when its path hash is below `val_fraction`.

    At least one file goes to each split (the lowest/highest hashes move), so tiny corpora still have a val set.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(rel_paths) < 2:
        raise ValueError(f"need at least 2 files to split into train and val, got {len(rel_paths)}")
    by_hash = sorted(rel_paths, key=lambda p: (path_hash(p), p))
    n_val = sum(path_hash(p) < val_fraction for p in rel_paths)
    n_val = min(max(n_val, 1), len(rel_paths) - 1)
    val = set(by_hash[:n_val])
    return {"train": [p for p in rel_paths if p not in val], "val": [p for p in rel_paths if p in val]}


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: uint16 up to 65536 ids, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; once the block succeeds it is renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tokens(path: str | Path, arrays: Iterable[np.ndarray], dtype: np.dtype) -> int:
    """Concatenate `arrays` into `path` as raw `dtype` values, in chunks, atomically; returns the count written."""
    count = 0
    with atomic_file(path) as f:
        pending: list[np.ndarray] = []
        pending_len = 0
        for array in arrays:
            pending.append(np.asarray(array, dtype=dtype))
            pending_len += len(array)
            if pending_len >= WRITE_CHUNK_TOKENS:
                f.write(np.concatenate(pending).tobytes())
                count, pending, pending_len = count + pending_len, [], 0
        if pending:
            f.write(np.concatenate(pending).tobytes())
            count += pending_len
    return count


def document_tokens(tokenizer: Tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    """Token ids of each text followed by eos, encoded a few documents at a time."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    for start in range(0, len(texts), ENCODE_CHUNK_DOCS):
        for ids in tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK_DOCS]):
            yield np.concatenate([ids, eos])


def prepare_corpus(
    out_dir: str | Path,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.02,
    max_files: int | None = None,
    root: str | Path | None = None,
) -> dict:
    """Tokenize the stdlib sources into `out_dir/{train,val}.bin` + `meta.json` (+ `tokenizer.json` for BPE).

    Files are taken in sorted order (the first `max_files` when given) and empty ones are skipped. The BPE
    tokenizer is trained on the train split only. Output is byte-identical across runs on the same interpreter;
    meta.json is written last, so its presence marks a complete directory. Returns the metadata.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "byte" and vocab_size not in (None, ByteTokenizer.vocab_size):
        raise ValueError(f"the byte tokenizer's vocab_size is fixed at {ByteTokenizer.vocab_size}, got {vocab_size}")
    if max_files is not None and max_files < 2:
        raise ValueError(f"max_files must be at least 2 (one train and one val file), got {max_files}")
    root = Path(root) if root is not None else stdlib_root()
    rel_paths = find_stdlib_sources(root)[:max_files]
    texts = {p: read_source(root / p) for p in rel_paths}
    kept = [p for p in rel_paths if texts[p].strip()]
    files = split_files(kept, val_fraction)

    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = BPETokenizer.train((texts[p] for p in files["train"]), vocab_size or DEFAULT_BPE_VOCAB)
    dtype = token_dtype(tok.vocab_size)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until the new meta.json lands
    for name, content in tok.artifacts().items():
        with atomic_file(out_dir / name) as f:
            f.write(content)
    splits = {}
    for split in SPLITS:
        n_tokens = write_tokens(out_dir / f"{split}.bin", document_tokens(tok, [texts[p] for p in files[split]]), dtype)
        splits[split] = {
            "file": f"{split}.bin",
            "tokens": n_tokens,
            "documents": len(files[split]),
            "files": files[split],
        }
    meta = {
        "version": FORMAT_VERSION,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "source": {
            "kind": "python-stdlib",
            "root": str(root),
            "python": platform.python_version(),
            "files_found": len(rel_paths),
            "files_skipped_empty": len(rel_paths) - len(kept),
        },
        "splits": splits,
    }
    with atomic_file(out_dir / META_FILE) as f:
        f.write((json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return meta


def load_meta(data_dir: str | Path) -> dict:
    """The metadata of a prepared data directory; a clear error when it is missing or from another version."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run scripts/prepare_data.py --out {data_dir} first")
    meta = json.loads(path.read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')}, this code reads version {FORMAT_VERSION}")
    return meta


def check_same_tokenizer(model_dir: str | Path, data_dir: str | Path, what: str) -> None:
    """Refuse a model directory (`what`: "teacher", "model.init_from checkpoint") whose recorded tokenizer (the
    meta.json an export copies beside the model, or a Hugging Face tokenizer.json) differs from the data's; a
    directory that records none is not checked."""
    model_dir, data = Path(model_dir), load_meta(data_dir)
    if (model_dir / META_FILE).is_file():
        meta = json.loads((model_dir / META_FILE).read_text())
        for key in ("tokenizer", "vocab_size", "eos_id"):
            if meta.get(key) != data.get(key):
                raise ValueError(
                    f"the {what} {model_dir} was trained with another tokenizer than the data {data_dir}: "
                    f"{key} {meta.get(key)!r} vs {data.get(key)!r}"
                )
    if not (model_dir / TOKENIZER_FILE).is_file():
        return
    if not (Path(data_dir) / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"the {what} {model_dir} has its own {TOKENIZER_FILE}, the data {data_dir} uses the "
            f"{data.get('tokenizer')} tokenizer: tokenize the data with the model's tokenizer "
            f"(scripts/prepare_data.py --tokenizer {model_dir})"
        )
    if _vocabulary(model_dir) != _vocabulary(Path(data_dir)):
        raise ValueError(
            f"the {what}'s {model_dir / TOKENIZER_FILE} and the data's {Path(data_dir) / TOKENIZER_FILE} "
            "are different tokenizers: the model and its data must share one"
        )


def _vocabulary(directory: Path) -> dict[str, int]:
    """The token -> id map of the tokenizer.json in `directory`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / TOKENIZER_FILE)).get_vocab()


# ---------------------------------------------------------------------------------------------------- reading


def dataset_facts(data_dir: str | Path) -> dict[str, Any]:
    """What identifies a prepared corpus cheaply: its tokenizer, vocabulary size and the tokens in each split (from
    the files' sizes, so a rewritten split shows)."""
    meta = load_meta(data_dir)
    itemsize = np.dtype(meta["dtype"]).itemsize
    facts: dict[str, Any] = {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"]}
    for split in SPLITS:
        file = Path(data_dir) / meta["splits"][split]["file"]
        facts[f"{split}_tokens"] = file.stat().st_size // itemsize if file.is_file() else None
    return facts


def epoch_steps(data_dir: str | Path, seq_len: int, micro_batch_size: int, grad_accum: int, dp_size: int) -> int:
    """Optimizer steps in one pass over the train split: each step takes grad_accum global batches of
    micro_batch_size * dp_size windows of seq_len tokens (as `ShardedBatches` deals them), so a run of at most
    this many steps sees no train token twice."""
    windows = (dataset_facts(data_dir)["train_tokens"] - 1) // seq_len
    return windows // (micro_batch_size * dp_size) // grad_accum


class TokenDataset:
    """Packed windows over a token file: window i covers tokens [i*seq_len, i*seq_len + seq_len + 1).

    Batches hold `input_ids` (window[:-1]), `targets` (window[1:], already shifted: targets[t] is the target of
    input_ids[t]), `document_ids` (0 for the window's first document, +1 at each eos input) and `position_ids`
    (restarting at 0 at the window start and at every eos input), all int64 of shape (B, seq_len).
    `dtype` and `eos_id` default to those in the meta.json beside the file. With a `mask` file (one uint8 per
    token, 0 where the token is no target the loss counts), those targets are IGNORE_INDEX.
    """

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        dtype: str | np.dtype | None = None,
        eos_id: int | None = None,
        mask: str | Path | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} does not exist")
        if dtype is None or eos_id is None:
            meta = load_meta(path.parent)
            dtype = meta["dtype"] if dtype is None else dtype
            eos_id = meta["eos_id"] if eos_id is None else eos_id
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.path, self.seq_len, self.eos_id = path, seq_len, int(eos_id)
        self.dtype = np.dtype(dtype)
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{path} has {size} bytes, not a whole number of {self.dtype.name} tokens")
        if size // self.dtype.itemsize < seq_len + 1:
            n_tokens = size // self.dtype.itemsize
            raise ValueError(f"{path} holds {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r")
        self.mask = None
        if mask is not None:
            if not Path(mask).is_file() or Path(mask).stat().st_size != len(self.tokens):
                raise ValueError(f"loss mask {mask} is missing or does not hold one byte per token of {path}")
            self.mask = np.memmap(mask, dtype=np.uint8, mode="r")

    @classmethod
    def from_dir(cls, data_dir: str | Path, split: str, seq_len: int) -> TokenDataset:
        """The `split` ("train" or "val") of a directory written by `prepare_corpus`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        meta = load_meta(data_dir)
        info = meta["splits"][split]
        mask = Path(data_dir) / info["mask"] if "mask" in info else None
        return cls(Path(data_dir) / info["file"], seq_len, meta["dtype"], meta["eos_id"], mask)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def get_batch(self, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The windows at `indices` as a batch of int64 tensors of shape (len(indices), seq_len)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (indices.size and not (0 <= indices.min() and indices.max() < len(self))):
            raise IndexError(f"window indices must be a 1-D list within [0, {len(self)})")
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window = self.tokens[offsets].astype(np.int64)
        inputs = window[:, :-1]
        starts = inputs == self.eos_id
        starts[:, 0] = True
        steps = np.arange(self.seq_len)
        last_start = np.maximum.accumulate(np.where(starts, steps, 0), axis=1)
        targets = window[:, 1:]
        if self.mask is not None:
            targets = np.where(self.mask[offsets[:, 1:]] == 0, IGNORE_INDEX, targets)
        arrays = {
            "input_ids": inputs,
            "targets": targets,
            "document_ids": np.cumsum(starts, axis=1) - 1,
            "position_ids": steps - last_start,
        }
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


@dataclass
class DataLoaderState:
    """Where an iterator stands: `index` is the next global batch to produce within `epoch`."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> DataLoaderState:
        if set(state) != {"epoch", "index"}:
            raise KeyError(f"data loader state needs exactly the keys 'epoch' and 'index', got {sorted(state)}")
        return cls(epoch=int(state["epoch"]), index=int(state["index"]))


class ShardedBatches:
    """Deterministic, resumable batches for one rank of `world_size`.

    Each epoch has one global order of window indices (a permutation seeded by (seed, epoch), or the identity
    with shuffle=False), cut into global batches of batch_size_per_rank * world_size windows; rank r takes the
    r-th slice of every global batch, so ranks never overlap and together see what one rank with the whole
    global batch would see. A trailing partial global batch is dropped. With loop=True iteration runs forever,
    epoch after epoch; otherwise it stops at the end of the current epoch (evaluation). The state counts global
    batches, so resuming needs the same dataset, seed and global batch size (the world size may change).
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        state: DataLoaderState | dict | None = None,
        shuffle: bool = True,
        loop: bool = True,
    ) -> None:
        if batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be positive, got {batch_size_per_rank}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size_per_rank, rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.global_batch_size = batch_size_per_rank * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{dataset.path} has {len(dataset)} windows of seq_len {dataset.seq_len}, fewer than one global batch "
                f"of {self.global_batch_size}; lower the batch size or seq_len"
            )
        self.state = DataLoaderState()
        self._order: tuple[int, np.ndarray] | None = None
        if state is not None:
            self.load_state_dict(state.to_dict() if isinstance(state, DataLoaderState) else state)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All window indices in the order epoch `epoch` visits them."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """This rank's window indices in global batch `index` of `epoch`."""
        start = index * self.global_batch_size + self.rank * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.state.index >= self.batches_per_epoch:
                if not self.loop:
                    return
                self.state = DataLoaderState(self.state.epoch + 1, 0)
            indices = self.batch_indices(self.state.epoch, self.state.index)
            self.state = DataLoaderState(self.state.epoch, self.state.index + 1)
            yield self.dataset.get_batch(indices)

    def seek(self, batch: int) -> None:
        """Continue from global batch `batch` of the stream (epoch after epoch), as if `batch` had been produced."""
        self.state = DataLoaderState(*divmod(batch, self.batches_per_epoch))

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch produced, as a plain dict."""
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict`."""
        new = DataLoaderState.from_dict(state)
        if new.epoch < 0 or not 0 <= new.index <= self.batches_per_epoch:
            raise ValueError(f"data loader state {state} does not fit {self.batches_per_epoch} batches per epoch")
        self.state = new
