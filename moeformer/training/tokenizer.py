"""Tokenizers for the training corpus: raw UTF-8 bytes (default) or a byte-level BPE trained with `tokenizers`.

Both reserve two special ids, `eos_id` (ends a document) and `bos_id` (free for prompts), and round-trip any text.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moeformer.safe_files import copy_confined

TOKENIZER_FILE = "tokenizer.json"
# what a model directory holds besides its weights for the tokenizer to be rebuilt (ours: meta.json + tokenizer.json;
# Hugging Face: tokenizer.json and its configs)
HF_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = ("meta.json", *HF_TOKENIZER_FILES, "generation_config.json")
EOS_TOKEN = "<|eos|>"
BOS_TOKEN = "<|bos|>"
N_BYTES = 256


class Tokenizer(ABC):
    """Common interface: `kind`, `vocab_size`, `eos_id`, `bos_id`, encode/decode and the files to store."""

    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as an int array (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are dropped and broken UTF-8 becomes U+FFFD."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.encode_batch([text])[0].tolist()

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a generation prompt: training documents start after an eos, so [eos] + encode(text)."""
        return [self.eos_id, *self.encode(text)]

    def artifacts(self) -> dict[str, bytes]:
        """Files (name -> content) that `load_tokenizer` needs beside the data; the byte tokenizer needs none."""
        return {}


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text, 256 is eos and 257 is bos: vocab_size 258."""

    kind = "byte"
    vocab_size = N_BYTES + 2
    eos_id = N_BYTES
    bos_id = N_BYTES + 1

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(list(ids), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the byte vocabulary [0, {self.vocab_size})")
        return ids[ids < N_BYTES].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization) from the `tokenizers` package; eos and bos are its first ids."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        # Text that happens to contain "<|eos|>" is encoded as ordinary characters, never as the special id.
        self._tokenizer.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = self._special_id(EOS_TOKEN)
        self.bos_id = self._special_id(BOS_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"BPE tokenizer has no special token {token!r}; was it trained by BPETokenizer.train?")
        return token_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from `texts` up to `vocab_size` ids (256 byte symbols and 2 specials included)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size <= N_BYTES + 2:
            raise ValueError(f"BPE vocab_size must exceed {N_BYTES + 2} (256 bytes + eos + bos), got {vocab_size}")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN, BOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read the tokenizer.json written from `artifacts()`."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BPE tokenizer file {path} does not exist")
        return cls(HFTokenizer.from_file(str(path)))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the BPE tokenizer's vocabulary [0, {self.vocab_size})")
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def artifacts(self) -> dict[str, bytes]:
        return {TOKENIZER_FILE: self._tokenizer.to_str().encode("utf-8")}


class PretrainedTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (data, no code), given as the file or a checkpoint directory holding it: its
    own special tokens are added to prompts (e.g. a bos). eos is, first found: `eos_id`, the token `eos_token`, the
    checkpoint's `eos_token_id` (generation_config.json, config.json), tokenizer_config.json's `eos_token`."""

    kind = "pretrained"

    def __init__(self, path: str | Path, eos_id: int | None = None, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no Hugging Face tokenizer at {path} (expected a {TOKENIZER_FILE} or a directory holding one)"
            )
        try:
            self._tokenizer = HFTokenizer.from_file(str(file))
        except Exception as error:  # the tokenizers library raises a bare Exception on a malformed file
            raise ValueError(f"{file} is not a readable tokenizer.json: {error}") from None
        self.file = file
        self.vocab_size = self._tokenizer.get_vocab_size()
        eos = eos_id if eos_id is not None else self._eos_of(file.parent, eos_token)
        if not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
            raise ValueError(
                f"no eos id for the tokenizer {file}: name it with an eos token (e.g. --eos-token "
                "'</s>'), or put eos_token_id in the directory's config.json"
            )
        self.eos_id = self.bos_id = eos

    def _eos_of(self, directory: Path, eos_token: str | None) -> int | None:
        if eos_token is not None:
            token_id = self._tokenizer.token_to_id(eos_token)
            if token_id is None:
                raise ValueError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")
            return token_id
        for name in ("generation_config.json", "config.json"):
            if (directory / name).is_file():
                eos = json.loads((directory / name).read_text()).get("eos_token_id")
                eos = eos[0] if isinstance(eos, list) and eos else eos
                if isinstance(eos, int):
                    return eos
        if (directory / "tokenizer_config.json").is_file():
            token = json.loads((directory / "tokenizer_config.json").read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                return self._tokenizer.token_to_id(token)
        return None

    def artifacts(self) -> dict[str, bytes]:
        """tokenizer.json and the configs beside it that transformers' AutoTokenizer reads."""
        files = {name: self.file.parent / name for name in HF_TOKENIZER_FILES} | {TOKENIZER_FILE: self.file}
        return {name: path.read_bytes() for name, path in files.items() if path.is_file()}

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]

    def encode_prompt(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the `TOKENIZER_FILES` that `src` has into `dst` (a derived checkpoint keeps its tokenizer), none that
    leads outside `src`; returns their names."""
    return copy_confined(Path(src), Path(dst), TOKENIZER_FILES)


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """Rebuild the tokenizer named in `data_dir/meta.json` (written by scripts/prepare_data.py and copied beside an
    exported model), or, without one, a Hugging Face checkpoint's `tokenizer.json`."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file() and (Path(data_dir) / TOKENIZER_FILE).is_file():
        return PretrainedTokenizer(data_dir)
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} does not exist (nor a Hugging Face {TOKENIZER_FILE}); run "
            f"scripts/prepare_data.py --out {data_dir} first"
        )
    meta = json.loads(meta_path.read_text())
    kind = meta.get("tokenizer")
    if kind == ByteTokenizer.kind:
        tokenizer: Tokenizer = ByteTokenizer()
    elif kind == BPETokenizer.kind:
        tokenizer = BPETokenizer.load(Path(data_dir) / TOKENIZER_FILE)
    elif kind == PretrainedTokenizer.kind:
        tokenizer = PretrainedTokenizer(Path(data_dir) / TOKENIZER_FILE, eos_id=meta.get("eos_id"))
    else:
        raise ValueError(f"{meta_path} names unknown tokenizer {kind!r}; expected 'byte', 'bpe' or 'pretrained'")
    if tokenizer.vocab_size != meta.get("vocab_size") or tokenizer.eos_id != meta.get("eos_id"):
        raise ValueError(
            f"{meta_path} says vocab_size={meta.get('vocab_size')}, eos_id={meta.get('eos_id')} but the {kind} "
            f"tokenizer has vocab_size={tokenizer.vocab_size}, eos_id={tokenizer.eos_id}"
        )
    return tokenizer
