"""A training corpus from the user's own files: plain text, JSON lines or parquet, tokenized by any tokenizer.

Files are read one at a time and streamed (parquet by record batch), so a corpus larger than memory works.
Documents go to train or val by a seeded hash of (file, index in file), tokenized in worker processes, and are
written in the token-file format of `prepare_corpus` (the trainer, packing and resume need no change). Instruction
data (prompt/response pairs) also writes a loss mask beside the tokens: 1 where the token is a target the loss
counts (the response and its closing eos), 0 on the prompt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moeformer.training.data import FORMAT_VERSION, META_FILE, SPLITS, atomic_file, token_dtype
from moeformer.training.tokenizer import Tokenizer

FORMATS = ("text", "jsonl", "parquet")
MASK_SUFFIX = ".mask"
CHUNK_DOCS = 256
Document = str | tuple[str, str]  # a text, or a (prompt, response) pair


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """The files matching `patterns` (globs, `**` recursive), sorted and without repeats; an error naming a pattern
    that matches no file."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"--files {pattern!r} matches no file")
        files.update(dict.fromkeys(matches))
    return list(files)


def read_documents(
    path: Path, fmt: str, text_field: str = "text", prompt_field: str | None = None, response_field: str | None = None
) -> Iterator[Document]:
    """The documents of one file: the whole file (text), one per line (jsonl) or one per row (parquet); with
    `prompt_field` and `response_field`, (prompt, response) pairs instead of `text_field`."""
    fields = (prompt_field, response_field) if prompt_field or response_field else (text_field,)
    if None in fields:
        raise ValueError("instruction data needs both a prompt field and a response field")
    try:
        if fmt == "text":
            yield path.read_text(encoding="utf-8")
        elif fmt == "jsonl":
            yield from _jsonl_documents(path, fields)
        elif fmt == "parquet":
            yield from _parquet_documents(path, fields)
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    except OSError as error:
        raise OSError(f"cannot read {path}: {error.strerror or error}") from None


def _document(values: list, fields: tuple[str, ...], where: str) -> Document:
    for field, value in zip(fields, values):
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}, not a string"
            raise ValueError(f"{where}: field {field!r} is {found}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _jsonl_documents(path: Path, fields: tuple[str, ...]) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a JSON object was expected, got {type(record).__name__}")
            yield _document([record.get(f) for f in fields], fields, f"{path}:{number}")


def _parquet_documents(path: Path, fields: tuple[str, ...]) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid on a file that is not parquet
        raise ValueError(f"{path} is not a readable parquet file: {error}") from None
    missing = [f for f in fields if f not in reader.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(reader.schema_arrow.names)})")
    row = 0
    for batch in reader.iter_batches(columns=list(fields), batch_size=1024):
        columns = [batch.column(f).to_pylist() for f in fields]
        for values in zip(*columns):
            row += 1
            yield _document(list(values), fields, f"{path} row {row}")


def document_split(seed: int, path: Path, index: int, val_fraction: float) -> str:
    """ "val" or "train" for document `index` of `path`, from a seeded hash (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\0{path.as_posix()}\0{index}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def train_texts(
    files: Sequence[str],
    fmt: str,
    *,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    val_fraction: float = 0.02,
    seed: int = 0,
) -> Iterator[str]:
    """The texts of the train split (a pair as prompt + response), streamed: what a BPE tokenizer is trained on."""
    fields = dict(text_field=text_field, prompt_field=prompt_field, response_field=response_field)
    for split, document in split_documents(expand_files(files), fmt, val_fraction, seed, **fields):
        if split == "train":
            yield document if isinstance(document, str) else document[0] + document[1]


def split_documents(
    paths: Sequence[Path], fmt: str, val_fraction: float, seed: int, **fields: str | None
) -> Iterator[tuple[str, Document]]:
    """Every document of `paths` in order, with the split ("train" or "val") its seeded hash gives it."""
    for path in paths:
        for index, document in enumerate(read_documents(path, fmt, **fields)):
            yield document_split(seed, path, index, val_fraction), document


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def encode_documents(tokenizer: Tokenizer, documents: list[Document]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Each document's token ids followed by eos, and for a (prompt, response) pair its loss mask: prompt and
    response are encoded separately and concatenated, the mask is 0 on the prompt, 1 on the response and the eos."""
    texts = [d if isinstance(d, str) else d[0] for d in documents]
    encoded = tokenizer.encode_batch(texts)
    responses = tokenizer.encode_batch([d[1] for d in documents if not isinstance(d, str)])
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    out, pairs = [], iter(responses)
    for document, ids in zip(documents, encoded):
        if isinstance(document, str):
            out.append((np.concatenate([ids, eos]), None))
        else:
            response = next(pairs)
            mask = np.concatenate([np.zeros(len(ids), np.uint8), np.ones(len(response) + 1, np.uint8)])
            out.append((np.concatenate([ids, response, eos]), mask))
    return out


def _encode_in_worker(chunk: tuple[str, list[Document]]) -> tuple[str, list[tuple[np.ndarray, np.ndarray | None]]]:
    split, documents = chunk
    return split, encode_documents(_worker_tokenizer, documents)


def prepare_user_data(
    out_dir: str | Path,
    files: Sequence[str],
    fmt: str,
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    val_fraction: float = 0.02,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of `files` (glob patterns) into `out_dir` (train/val .bin, .mask for instruction
    data, the tokenizer's files, meta.json last). Returns the metadata."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    paths = expand_files(files)
    instruction = bool(prompt_field or response_field)
    fields = dict(text_field=text_field, prompt_field=prompt_field, response_field=response_field)
    source = {
        "kind": "files",
        "format": fmt,
        "files": len(paths),
        "file_list_sha256": hashlib.sha256("\n".join(p.as_posix() for p in paths).encode()).hexdigest(),
        "seed": seed,
        "fields": [prompt_field, response_field] if instruction else [text_field],
    }
    documents = split_documents(paths, fmt, val_fraction, seed, **fields)
    return write_corpus(
        out_dir, tokenizer, documents, source, val_fraction, instruction=instruction, workers=workers, progress=progress
    )


def write_corpus(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    documents: Iterable[tuple[str, Document]],
    source: dict,
    val_fraction: float,
    *,
    instruction: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Tokenize (split, document) pairs in worker processes into `out_dir`: the tokenizer's files, train/val .bin
    (and .mask for instruction data), then meta.json (recording `source`) last. Returns the metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # incomplete until the new meta.json lands
    artifacts = tokenizer.artifacts()
    for name, content in artifacts.items():
        with atomic_file(out_dir / name) as f:
            f.write(content)

    def chunks() -> Iterator[tuple[str, list[Document]]]:
        """Runs of up to CHUNK_DOCS documents of one split, each split's documents in order."""
        pending: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for split, document in documents:
            pending[split].append(document)
            if len(pending[split]) == CHUNK_DOCS:
                yield split, pending[split]
                pending[split] = []
        yield from ((s, docs) for s, docs in pending.items() if docs)

    counts = {s: {"tokens": 0, "documents": 0, "loss_tokens": 0} for s in SPLITS}
    with ExitStack() as stack:
        outputs = {s: stack.enter_context(atomic_file(out_dir / f"{s}.bin")) for s in SPLITS}
        masks = {s: stack.enter_context(atomic_file(out_dir / f"{s}.bin{MASK_SUFFIX}")) for s in SPLITS if instruction}
        pool = (
            stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)))
            if workers > 1
            else None
        )
        bar = stack.enter_context(tqdm(desc="documents", unit="doc", disable=not progress))
        results = (
            pool.imap(_encode_in_worker, chunks())
            if pool
            else ((split, encode_documents(tokenizer, docs)) for split, docs in chunks())
        )
        for split, encoded in results:
            for ids, mask in encoded:
                outputs[split].write(ids.astype(dtype).tobytes())
                if instruction:
                    masks[split].write(mask.tobytes())
                counts[split]["tokens"] += len(ids)
                counts[split]["loss_tokens"] += int(mask.sum()) if instruction else len(ids)
            counts[split]["documents"] += len(encoded)
            bar.update(len(encoded))
        empty = [s for s in SPLITS if counts[s]["documents"] == 0]
        if empty:
            total = sum(c["documents"] for c in counts.values())
            raise ValueError(
                f"the {empty[0]} split got no document out of {total}; use more documents or another --val-fraction"
            )
    meta = {
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer.kind,
        "tokenizer_sha256": {name: hashlib.sha256(c).hexdigest() for name, c in artifacts.items()},
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "source": source,
        "splits": {
            s: {"file": f"{s}.bin", **({"mask": f"{s}.bin{MASK_SUFFIX}"} if instruction else {}), **counts[s]}
            for s in SPLITS
        },
    }
    with atomic_file(out_dir / META_FILE) as f:
        f.write((json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return meta
