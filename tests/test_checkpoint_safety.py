"""Loading never runs code nor reads outside the checkpoint, saving never deletes what it does not own, and errors say
what failed and where: malformed safetensors headers and indexes (and a seeded fuzz of both), names and symlinks
leading out, pickles planted in a real training checkpoint, saves over a checkpoint and crashes during them, failed
writes, wrongly typed config values. This file doubles as the worker of the training scenarios (the trainer joins a
process group): `python tests/test_checkpoint_safety.py <scenario> <workdir>`."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeformer.errors import CheckpointError, ConfigError, write_error
from moeformer.models.checkpoint import save_pretrained
from moeformer.models.config import ModelConfig
from moeformer.models.hf import family_for_config
from moeformer.models.model import CausalLM, from_pretrained
from moeformer.training.config import load_config
from moeformer.training.run_checkpoints import CheckpointManager
from tests.workers import REPO, worker_env

ENV = worker_env(OMP_NUM_THREADS="1")


def tiny_model(seed: int = 0, **overrides) -> CausalLM:
    """A dense Llama-style model of a few KB: every tensor maps 1:1 to an HF name."""
    torch.manual_seed(seed)
    config = dict(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_dim=24, max_seq_len=16, moe=None)
    model = CausalLM(ModelConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


def same_weights(a: CausalLM, b: CausalLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def read_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (with __metadata__) and data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict | list | bytes, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


# ---- every file a loader opens ---------------------------------------------------------------------------------

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


@contextmanager
def opened_files():
    """Every path opened inside the block (Python's "open" audit event: builtins.open, os.open, io.open_code)."""
    global _opened
    if not getattr(sys, "_checkpoint_safety_audit", False):
        sys.addaudithook(_audit)  # permanent once added: records only inside this block
        sys._checkpoint_safety_audit = True
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def inside(path: str | Path, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


# ---- malformed safetensors headers ------------------------------------------------------------------------------


def _edit_entry(name: str, **fields):
    def edit(header, data):
        header[name].update(fields)
        return header, data

    return edit


def _drop_field(name: str, field: str):
    def edit(header, data):
        del header[name][field]
        return header, data

    return edit


def _overlap(header, data):
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    return header, data


def _out_of_range(header, data):
    header["extra"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    return header, data


def _gap(header, data):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    return header, data + bytes(4)


EMBED = "model.embed_tokens.weight"  # (32, 16) float32: 2048 bytes
MALFORMED = {
    "missing data_offsets": (_drop_field(EMBED, "data_offsets"), "needs dtype, shape and data_offsets"),
    "overlapping data_offsets": (_overlap, "overlaps the tensor before it"),
    "data_offsets past the end": (_out_of_range, "truncated: its tensors need"),
    "unused bytes between tensors": (_gap, "unused"),
    "bytes after the last tensor": (lambda h, d: (h, d + bytes(8)), "8 bytes after its last tensor"),
    "negative data_offsets": (_edit_entry(EMBED, data_offsets=[-8, 2040]), r"not \[begin, end\]"),
    "end before begin": (_edit_entry(EMBED, data_offsets=[2048, 0]), r"not \[begin, end\]"),
    "shape and byte size disagree": (_edit_entry(EMBED, shape=[32, 15]), "needs 1920 bytes, its data_offsets span"),
    "string shape": (_edit_entry(EMBED, shape=["32", 16]), "not a list of non-negative integers"),
    "unknown dtype": (_edit_entry(EMBED, dtype="F7"), "unsupported dtype 'F7'"),
    "dtype not a string": (_edit_entry(EMBED, dtype=4), "not a string"),
    "entry not an object": (lambda h, d: ({**h, EMBED: [1, 2]}, d), "needs dtype, shape and data_offsets"),
    "header not an object": (lambda h, d: ([h], d), "a JSON list, not an object"),
    "header not JSON": (lambda h, d: (b"{'not': json}", d), "corrupt safetensors header"),
    "metadata not strings": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__ must map"),
}


@pytest.fixture
def single(tmp_path) -> Path:
    save_pretrained(tiny_model(), tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_header_is_refused_with_a_checkpoint_error(single, case):
    edit, message = MALFORMED[case]
    path = single / "model.safetensors"
    header, data = edit(*read_raw(path))
    write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(single)


@pytest.mark.parametrize(
    "length, message",
    [(2**40, "header would be 1099511627776 bytes"), (2**64 - 1, "not a safetensors file"), (10**6, "truncated")],
)
def test_huge_header_length_is_refused_before_reading(single, length, message):
    path = single / "model.safetensors"
    header, data = read_raw(path)
    write_raw(path, header, data, length=length)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(single)


def test_integer_tensor_for_a_float_parameter_is_refused(single):
    path = single / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = torch.arange(16, dtype=torch.int32)  # same bytes and shape: a silent cast before
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model.norm.weight: integer torch.int32 for floating-point norm.weight"):
        from_pretrained(single)


# ---- names and symlinks leading out ------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A sharded HF checkpoint, and outside it a valid copy of its files: following a name out would load fine."""
    save_pretrained(tiny_model(), tmp_path / "ck", max_shard_size="6KB")
    shutil.copytree(tmp_path / "ck", tmp_path / "outside")
    return tmp_path / "ck"


def _point_shard(ck: Path, target: str) -> None:
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][EMBED]
    index["weight_map"] = {k: target if v == shard else v for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_of(ck: Path, name: str = EMBED) -> str:
    return json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"][name]


ESCAPES = {
    "relative ../": lambda ck: _point_shard(ck, f"../outside/{_shard_of(ck)}"),
    "through a subdirectory": lambda ck: _point_shard(ck, f"sub/../../outside/{_shard_of(ck)}"),
    "absolute path": lambda ck: _point_shard(ck, str(ck.parent / "outside" / _shard_of(ck))),
    "shard is a symlink out": lambda ck: (
        (ck / _shard_of(ck)).unlink() or (ck / _shard_of(ck)).symlink_to(ck.parent / "outside" / _shard_of(ck))
    ),
    "directory symlink out": lambda ck: (
        (ck / "linked").symlink_to(ck.parent / "outside") or _point_shard(ck, f"linked/{_shard_of(ck)}")
    ),
    "index is a symlink out": lambda ck: (
        (ck / "model.safetensors.index.json").unlink()
        or (ck / "model.safetensors.index.json").symlink_to(ck.parent / "outside" / "model.safetensors.index.json")
    ),
    "config is a symlink out": lambda ck: (
        (ck / "config.json").unlink() or (ck / "config.json").symlink_to(ck.parent / "outside" / "config.json")
    ),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_names_and_symlinks_leading_out_of_the_checkpoint_are_refused(sharded, case):
    ESCAPES[case](sharded)
    with opened_files() as opened, pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        from_pretrained(sharded)
    assert not [p for p in opened if inside(p, sharded.parent / "outside")]


def test_hugging_face_cache_snapshot_with_symlinks_into_blobs_loads(tmp_path):
    """The hub client's own layout: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    model = tiny_model()
    save_pretrained(model, tmp_path / "plain")
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "plain").iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    assert same_weights(from_pretrained(snapshot), model)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "plain" / "model.safetensors")  # out of the repository
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        from_pretrained(snapshot)


def test_training_checkpoint_latest_marker_cannot_point_elsewhere(tmp_path):
    own, other = tmp_path / "run" / "checkpoints", tmp_path / "other" / "checkpoints"
    for root, step in ((own, 3), (other, 9)):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "COMPLETE").write_text("{}")
    (own / "latest").write_text("../../other/checkpoints/step_00000009")
    assert CheckpointManager(own).latest() == own / "step_00000003"


# ---- seeded fuzz of headers and indexes --------------------------------------------------------------------------

FUZZ_CASES = 1000


def _overwrite(path: Path, data: bytes) -> None:
    """Rewrite a file in place: truncating one to zero bytes first makes ext4 flush it to disk on close (~2 ms)."""
    with open(path, "r+b" if path.is_file() else "wb") as f:
        f.write(data)
        f.truncate()


def _parsed(raw: bytes) -> tuple[int, dict] | None:
    """(header length, header) of safetensors bytes whose header is still a JSON object of entries, else None."""
    (n,) = struct.unpack("<Q", raw[:8]) if len(raw) >= 8 else (len(raw),)
    try:
        header = json.loads(raw[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(header, dict) and all(
        isinstance(e, dict)
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and isinstance(e.get("shape"), list)
        for k, e in header.items()
        if k != "__metadata__"
    )
    return (n, header) if ok and len(header) > 1 else None


def _mutate_header(rng: random.Random, ck: Path, file: str) -> None:
    path = ck / file
    if path.is_symlink():  # replaced by an index mutation already
        return
    raw = bytearray(path.read_bytes())
    parsed = _parsed(bytes(raw))
    kinds = ["flip", "truncate", "length"] + (["offsets", "shape", "dtype", "json", "benign"] * 2 if parsed else [])
    kind = rng.choice(kinds) if len(raw) > 8 else "length"
    n = parsed[0] if parsed else len(raw) - 8
    if kind == "flip":  # bytes of the length prefix or the JSON header
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(min(8 + n, len(raw)))] ^= 1 << rng.randrange(8)
        _overwrite(path, bytes(raw))
    elif kind == "truncate":
        _overwrite(path, bytes(raw[: rng.randrange(len(raw))]))
    elif kind == "length":
        length = rng.choice([0, 1, max(n - 1, 0), n + 1, len(raw), 2**32, 2**63, 2**64 - 1, rng.randrange(2**64)])
        _overwrite(path, struct.pack("<Q", length) + bytes(raw[8:]))
    else:
        header, data = parsed[1], bytes(raw[8 + n :])
        names = [k for k in header if k != "__metadata__"]
        name, other = rng.choice(names), rng.choice(names)
        entry = header[name]
        if kind == "offsets":
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(
                [
                    [end, begin],
                    [begin + 4, end + 4],
                    [begin - 4, end - 4],
                    [begin, end + 4],
                    [0, end - begin],
                    [begin, len(data) + 4],
                    [-1, end],
                    [begin],
                    [str(begin), end],
                    None,
                    header[other]["data_offsets"],
                ]
            )
            if rng.random() < 0.3:  # exchange the byte ranges of two tensors: a valid file holding other weights
                entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [begin, end]
        elif kind == "shape":
            shape = entry["shape"]
            entry["shape"] = rng.choice(
                [
                    shape[::-1],
                    [*shape, 1],
                    shape[:-1],
                    [-1, *shape[1:]],
                    [2**62, 2**62],
                    [str(d) for d in shape],
                    [],
                    [0] * len(shape),
                    [d + 1 for d in shape],
                ]
            )
        elif kind == "dtype":
            entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "", 7, None])
        elif kind == "benign":  # still the same tensors: other key order, more metadata, space padding
            header = dict(rng.sample(sorted(header.items()), len(header)))
            metadata = header.get("__metadata__")
            metadata = metadata if isinstance(metadata, dict) else {}
            header["__metadata__"] = {**metadata, "note": "x" * rng.randrange(9)}
            text = json.dumps(header).encode() + b" " * rng.randrange(8)
            _overwrite(path, struct.pack("<Q", len(text)) + text + data)
            return
        else:
            header = rng.choice(
                [
                    [header],
                    None,
                    "x",
                    {**header, "__metadata__": [1]},
                    {name: entry},
                    {**header, "extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                ]
            )
        text = json.dumps(header).encode()
        _overwrite(path, struct.pack("<Q", len(text)) + text + data)


def _mutate_index(rng: random.Random, ck: Path, shards: list[str]) -> None:
    path = ck / "model.safetensors.index.json"
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        name = rng.choice(sorted(weight_map))
        valid = isinstance(weight_map[name], str)
    except (ValueError, KeyError, TypeError, IndexError):
        valid = False
    # an index broken by an earlier mutation can only have its bytes changed further
    kind = rng.choice(["target", "target", "names", "structure", "symlink", "bytes"]) if valid else "bytes"
    outside = ck.parent / "outside"
    if kind == "target":
        weight_map[name] = rng.choice(
            [
                f"../outside/{weight_map[name]}",
                str(outside / weight_map[name]),
                f"sub/../../outside/{weight_map[name]}",
                f"./{weight_map[name]}",
                f"sub/../{weight_map[name]}",
                rng.choice(shards),
                "missing.safetensors",
                "",
                ".",
                "config.json",
                "/etc/hostname",
                "/dev/zero",
                "/proc/self/environ",
                "a\0b",
                "x" * 300,
                7,
                None,
            ]
        )
    elif kind == "names":
        if rng.random() < 0.5:
            del weight_map[name]
        else:
            weight_map[name + ".extra"] = weight_map[name]
    elif kind == "structure":
        index = rng.choice([{}, [], {"weight_map": []}, {"weight_map": None}, {"weight_map": {name: weight_map[name]}}])
    elif kind == "symlink":  # a shard replaced by a symlink: out, to a device, to itself, to a directory, inside
        shard = ck / rng.choice(shards)
        shard.unlink()
        targets = [outside / shard.name, Path("/dev/zero"), shard, ck.parent, ck / rng.choice(shards)]
        shard.symlink_to(rng.choice(targets))
    else:
        text = bytearray(path.read_bytes())
        if text:
            text[rng.randrange(len(text))] ^= 1 << rng.randrange(8)
            _overwrite(path, bytes(text[: rng.randrange(1, len(text) + 1)]))
        return
    _overwrite(path, json.dumps(index).encode())


def _expected_weights(ck: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """What the (mutated) checkpoint holds by the reference reader (the safetensors library), under our names; raises
    if the reference reader refuses any of it or a file it names lies outside."""
    weight_map = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for m in family_for_config(config).tensor_maps(config):
        (name,) = m.export.names
        file = (ck / weight_map[name]).resolve()
        assert file.is_relative_to(ck.resolve()), file
        with safe_open(file, "pt") as f:
            out[m.ours] = f.get_tensor(name)
    return out


def test_fuzzed_headers_and_indexes_load_exactly_or_raise_a_checkpoint_error(tmp_path):
    """1000 seeded mutations of a real sharded checkpoint's headers and index (bit flips, truncations, length
    prefixes, offset / shape / dtype edits, names leading out, absolute paths, symlinks out, to devices and in loops):
    each loads weights equal to what the safetensors library reads from the files, or raises CheckpointError; no
    file outside the checkpoint is ever opened."""
    model = tiny_model()
    ck = tmp_path / "ck"
    save_pretrained(model, ck, max_shard_size="6KB")
    shutil.copytree(ck, tmp_path / "outside")
    pristine = {p.name: p.read_bytes() for p in ck.iterdir()}
    shards = sorted(name for name in pristine if name.startswith("model-"))
    assert len(shards) >= 3
    from_pretrained(ck)  # lazy imports happen outside the audited loads
    rng = random.Random(1234)
    outcomes, escapes, wrong = {"loaded": 0, "refused": 0}, [], []
    for case in range(FUZZ_CASES):
        for name, data in pristine.items():  # restore in place (deleting files is slow on some file systems)
            if (ck / name).is_symlink():
                (ck / name).unlink()
            if not (ck / name).is_file() or (ck / name).read_bytes() != data:
                _overwrite(ck / name, data)
        for _ in range(rng.choice([1, 1, 2, 3])):
            if rng.random() < 0.6:
                _mutate_header(rng, ck, rng.choice(shards))
            else:
                _mutate_index(rng, ck, shards)
        with opened_files() as opened:
            try:
                loaded = from_pretrained(ck)
            except CheckpointError:
                outcomes["refused"] += 1
                loaded = None
            except Exception as e:
                raise AssertionError(f"case {case}: {type(e).__name__}: {e}") from e
        escapes += [(case, p) for p in opened if not inside(p, ck)]
        if loaded is not None:
            outcomes["loaded"] += 1
            expected = _expected_weights(ck, model.config)
            state = loaded.state_dict()
            wrong += [(case, k) for k, v in expected.items() if not torch.equal(state[k], v.to(state[k].dtype))]
    assert not escapes, escapes[:5]
    assert not wrong, wrong[:5]
    assert outcomes["loaded"] > 50 and outcomes["refused"] > 500, outcomes  # both outcomes are exercised


# ---- saving over a checkpoint ------------------------------------------------------------------------------------

FOREIGN = {
    "tokenizer.json": '{"model": {}}',
    "README.md": "# model card",
    "generation_config.json": '{"top_k": 5}',
    "original/params.json": '{"dim": 16}',
}


def _add_foreign(ck: Path) -> None:
    for name, text in FOREIGN.items():
        (ck / name).parent.mkdir(exist_ok=True)
        (ck / name).write_text(text)


def _foreign_intact(ck: Path) -> bool:
    return all((ck / name).is_file() and (ck / name).read_text() == text for name, text in FOREIGN.items())


def test_save_over_a_checkpoint_keeps_files_it_does_not_own_and_drops_stale_ones(tmp_path):
    old, new = tiny_model(0), tiny_model(1)
    ck = tmp_path / "ck"
    save_pretrained(old, ck, max_shard_size="6KB")
    _add_foreign(ck)
    ck.chmod(0o750)
    save_pretrained(new, ck)  # one file now: the old index and shards must go, or the loader would read them
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        ["config.json", "model.safetensors", "original", *[n for n in FOREIGN if "/" not in n]]
    )
    assert _foreign_intact(ck) and same_weights(from_pretrained(ck), new)
    assert ck.stat().st_mode & 0o777 == 0o750
    save_pretrained(old, ck, format="native", max_shard_size="6KB")  # a stale config.json would win over config.yaml
    assert not (ck / "config.json").exists() and (ck / "config.yaml").is_file()
    assert _foreign_intact(ck) and same_weights(from_pretrained(ck), old)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert.py"), str(ck), str(ck), "--to", "hf"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _foreign_intact(ck) and same_weights(from_pretrained(ck), old)
    assert not list(ck.glob("model-*")) and not (ck / "config.yaml").exists()


def _can_exchange(work: Path) -> bool:
    """Whether this system and file system swap two directories atomically (what a save over a checkpoint needs)."""
    import ctypes

    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    return (
        hasattr(libc, "renameat2")
        and libc.renameat2(at_fdcwd, bytes(work / "a"), at_fdcwd, bytes(work / "b"), rename_exchange) == 0
    )


class Crash(BaseException):
    """A process killed mid-save, as far as the save can tell."""


def test_a_crash_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Fail the k-th file-system call of a save over an existing checkpoint, for every k: the path always holds a
    complete checkpoint (the old or the new one) and the files the save does not own."""
    if not _can_exchange(tmp_path / "probe"):
        pytest.skip("no atomic directory exchange here (renameat2 RENAME_EXCHANGE: Linux >= 3.15, most file systems)")
    old, new = tiny_model(0), tiny_model(1)
    ck = tmp_path / "ck"
    save_pretrained(old, ck, max_shard_size="6KB")
    _add_foreign(ck)
    calls = {"n": 0, "crash_at": 0}

    def counted(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash
            return real(*args, **kwargs)

        return call

    for name in ("rename", "link", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    for name in ("rmtree", "copy2", "copytree"):
        monkeypatch.setattr(shutil, name, counted(getattr(shutil, name)))
    crashes = 0
    for k in range(1, 200):
        calls.update(n=0, crash_at=k)
        try:
            save_pretrained(new if k % 2 else old, ck)
        except Crash:
            crashes += 1
        else:
            break
        calls["crash_at"] = 0
        loaded = from_pretrained(ck)
        assert same_weights(loaded, old) or same_weights(loaded, new), k
        assert _foreign_intact(ck), k
    assert crashes >= 5 and _foreign_intact(ck)


# ---- failed writes -------------------------------------------------------------------------------------------------


def test_write_error_names_the_file_and_the_cause(tmp_path):
    missing = tmp_path / "gone" / "model.pt"
    try:
        open(missing, "wb")
    except OSError as e:
        assert str(write_error(missing, e)) == f"[Errno 2] cannot write {missing}: No such file or directory"
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    error = write_error(missing, unexpected_pos)  # torch's writer says nothing: the file system does
    assert error.errno == errno.ENOENT and str(missing) in str(error)
    assert str(write_error(tmp_path / "x.pt", unexpected_pos)).endswith("unexpected pos 704 vs 598")
    if Path("/dev/full").is_char_device():
        try:
            with open("/dev/full", "wb") as f:  # a real ENOSPC, written through a Python file as checkpoints are
                torch.save({"w": torch.zeros(10_000)}, f)
        except OSError as e:
            assert str(write_error(tmp_path / "model.pt", e)).endswith("model.pt: No space left on device")


def _limit_file_size() -> None:
    """In the child: writes past 256 KB fail with EFBIG (a real failed write, like a full disk, for any user)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def test_failed_writes_are_one_line_naming_the_file_and_the_cause(tmp_path):
    save_pretrained(tiny_model(dim=128, ffn_dim=256), tmp_path / "ck")  # ~700 KB in one file
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/convert.py"),
            str(tmp_path / "ck"),
            str(tmp_path / "out"),
            "--to",
            "native",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
    )
    assert _one_error_line(done) == f"error: cannot write {tmp_path / 'out' / 'model.safetensors'}: File too large"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

    from moeformer.training.data import prepare_corpus

    prepare_corpus(tmp_path / "data", max_files=8, val_fraction=0.2)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # DeepSpeed compiles this op on first use: its build must not run under the file-size limit
    overrides = [
        f"--out_dir={tmp_path / 'run'}",
        f"--data.dir={tmp_path / 'data'}",
        "--data.seq_len=32",
        "--data.micro_batch_size=2",
        "--train.steps=2",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--train.progress_bar=false",
        "--train.zero_stage=0",
        "--train.dtype=fp32",
        "--model.dim=64",
        "--model.n_layers=2",
        "--model.vocab_size=258",
        "--checkpoint.export=none",
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), *overrides],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=300,
    )
    model_file = tmp_path / "run" / "checkpoints" / ".staging-step_00000002" / "mp_rank_00_model_states.pt"
    assert _one_error_line(done) == f"error: cannot write {model_file}: File too large"


# ---- config values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.dim=abc", "'model.dim' expects int, got 'abc'"),
        ("--model.norm_eps=small", "'model.norm_eps' expects a number, got 'small'"),
        ("--model.moe.top_k=1.5", "'model.moe.top_k' expects int, got 1.5"),
        ("--model.attention_types=[softmax, 3]", r"'model.attention_types\[1\]' expects str, got 3"),
        ("--model.rope_scaling=linear", "'model.rope_scaling' must be a mapping"),
        ("--optim.lr=fast", "'optim.lr' expects a number, got 'fast'"),
    ],
)
def test_wrongly_typed_config_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override]).model_config()


def test_numbers_yaml_reads_as_strings_become_floats(tmp_path):
    (tmp_path / "run.yaml").write_text("model: {name: tiny-moe, norm_eps: 1e-5, rope_theta: 5e5}\noptim: {lr: 2e-3}\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.optim.lr == 2e-3 and config.model_config().norm_eps == 1e-5
    assert config.model_config().rope_theta == 5e5


def test_train_script_reports_a_wrongly_typed_value_in_one_line():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), "--model.dim=abc"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert _one_error_line(done) == "error: config key 'model.dim' expects int, got 'abc'"


# ---- pickles planted in a real training checkpoint --------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _plant(checkpoint_dir: Path, name: str, sentinel: Path) -> None:
    """Replace `name` by a pickle that creates `sentinel`, and update the COMPLETE marker to match, as the author of
    a malicious checkpoint would."""
    from moeformer.training.run_checkpoints import COMPLETE_FILE, file_crc32

    torch.save({"module": Payload(sentinel), "optimizer_state_dict": Payload(sentinel)}, checkpoint_dir / name)
    marker = json.loads((checkpoint_dir / COMPLETE_FILE).read_text())
    marker["files"][name] = {"size": (checkpoint_dir / name).stat().st_size, "crc32": file_crc32(checkpoint_dir / name)}
    (checkpoint_dir / COMPLETE_FILE).write_text(json.dumps(marker))


def scenario_planted(work: Path) -> dict:
    """A real 2-step ZeRO-1 run (one process) and its checkpoint, then resumes of copies of it with a pickle planted
    in the model file, in the optimizer shard, and with the model file a symlink out of the checkpoint (same bytes);
    the untouched copy as control; offline consolidation of the planted and the symlinked copy."""
    from moeformer.parallel import consolidate_checkpoint
    from moeformer.parallel.reshard import LAYOUT_FILE
    from moeformer.training.trainer import Trainer

    def config(name: str, **overrides):
        return load_config(
            None,
            {
                "out_dir": str(work / name),
                "data.dir": str(work / "data"),
                "data.seq_len": 32,
                "data.micro_batch_size": 2,
                "train.steps": 2,
                "train.zero_stage": 1,
                "train.dtype": "fp32",
                "train.eval_every": 0,
                "train.eval_batches": 1,
                "train.progress_bar": False,
                "checkpoint.export": "none",
                "model": {"name": "tiny-moe", "dim": 32, "n_layers": 2, "vocab_size": 258},
                **overrides,
            },
        )

    Trainer(config("run")).train()
    saved = work / "run" / "checkpoints" / "step_00000002"
    (work / "outside").mkdir()
    shutil.copy(saved / "mp_rank_00_model_states.pt", work / "outside")
    cases = {
        "model_pickle": lambda ck: _plant(ck, "mp_rank_00_model_states.pt", work / "ran_model_pickle"),
        "optimizer_pickle": lambda ck: _plant(
            ck, "zero_pp_rank_0_mp_rank_00_optim_states.pt", work / "ran_optimizer_pickle"
        ),
        "symlink_out": lambda ck: (
            (ck / "mp_rank_00_model_states.pt").unlink()
            or (ck / "mp_rank_00_model_states.pt").symlink_to(work / "outside" / "mp_rank_00_model_states.pt")
        ),
        "untouched": lambda ck: None,
    }
    out = {}
    for case, edit in cases.items():
        ck = work / case / "step_00000002"
        shutil.copytree(saved, ck)
        edit(ck)
        try:
            trainer = Trainer(
                config(
                    f"resume_{case}",
                    **{"checkpoint.resume": str(ck), "train.steps": 3, "checkpoint.resume_allow": ["train.steps"]},
                )
            )
            out[case] = {"error": None, "step": trainer.step}
        except Exception as e:  # the test checks the type
            out[case] = {"error": f"{type(e).__name__}: {e}"}
        (ck.parent / LAYOUT_FILE).write_text("{}")  # no sharded parameters: consolidation reads the model file
        try:
            consolidate_checkpoint(ck.parent, ck.name)
            out[case]["consolidate"] = None
        except Exception as e:
            out[case]["consolidate"] = f"{type(e).__name__}: {e}"
    out["ran"] = sorted(p.name for p in work.glob("ran_*"))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    from moeformer.training.data import prepare_corpus

    work = tmp_path_factory.mktemp("planted")
    prepare_corpus(work / "data", max_files=8, val_fraction=0.2)
    proc = subprocess.run(
        [sys.executable, __file__, "planted", str(work)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((work / "planted.json").read_text())


def test_resume_refuses_a_planted_pickle_and_runs_none_of_it(planted):
    assert planted["ran"] == []  # no payload ran, in the trainer or in offline consolidation
    for case, file in (
        ("model_pickle", "mp_rank_00_model_states.pt"),
        ("optimizer_pickle", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ):
        assert planted[case]["error"].startswith("CheckpointError: refusing to unpickle"), planted[case]
        assert file in planted[case]["error"] and "it names io.open" in planted[case]["error"]
    assert planted["model_pickle"]["consolidate"].startswith("CheckpointError: refusing to unpickle")
    assert planted["untouched"] == {"error": None, "step": 2, "consolidate": None}  # the allow-list admits real ones


def test_resume_refuses_a_checkpoint_file_that_is_a_symlink_out(planted):
    for key in ("error", "consolidate"):
        assert (planted["symlink_out"][key] or "").startswith("CheckpointError: "), planted["symlink_out"]
        assert "outside the checkpoint directory" in planted["symlink_out"][key], planted["symlink_out"]


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    result = globals()[f"scenario_{scenario}"](workdir)
    (workdir / f"{scenario}.json").write_text(json.dumps(result))
    from moeformer.parallel import shutdown_distributed

    shutdown_distributed()
