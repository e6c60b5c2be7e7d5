"""A pinned code corpus: the Python sources inside a list of wheels, each pinned by file name and sha256.

The `.py` members are read straight out of the wheel archives (nothing is installed, so the corpus does not depend
on the interpreter that builds it) and listed in a sorted order: wheels by file name, members by path. Files larger
than the recipe's `max_file_bytes` (generated tables), blank files and exact duplicates of an earlier file (vendored
copies) are left out. Each document is named `<wheel>/<member>`, goes to train or val by a seeded hash of that name
and is written in an order shuffled by another; the meta records hashes of the recipe, the wheels, the file list
and the contents.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moeformer.training.data import decode_source
from moeformer.training.tokenizer import BPETokenizer, Tokenizer
from moeformer.training.user_data import document_split, write_corpus

MIB = 1 << 20


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: its file name, the sha256 and size of the file, and the part it travels in."""

    file: str
    sha256: str
    bytes: int
    part: str

    @property
    def requirement(self) -> str:
        """`name==version` of the wheel, from its file name (PEP 427: name-version-...whl)."""
        name, version = self.file.split("-")[:2]
        return f"{name}=={version}"


@dataclass(frozen=True)
class Recipe:
    """A corpus recipe (configs/data/*.yaml): the wheels, how files are filtered and split, the BPE tokenizer."""

    name: str
    path: Path
    sha256: str
    wheels: tuple[Wheel, ...]
    seed: int = 0
    val_fraction: float = 0.02
    max_file_bytes: int = 1_000_000
    vocab_size: int = 8192
    tokenizer_sample_bytes: int = 40_000_000
    part_max_mib: int = 60
    suffixes: tuple[str, ...] = (".py",)

    def parts(self) -> dict[str, list[Wheel]]:
        """The wheels of each part (a set of wheels small enough to travel as one upload)."""
        out: dict[str, list[Wheel]] = {}
        for wheel in self.wheels:
            out.setdefault(wheel.part, []).append(wheel)
        return out


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; an error names the recipe and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus recipe {path} does not exist")
    raw = path.read_bytes()
    spec = yaml.safe_load(raw) or {}
    known = {"name", "seed", "val_fraction", "max_file_bytes", "tokenizer", "part_max_mib", "suffixes", "wheels"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected some of {sorted(known)}")
    entries = spec.get("wheels") or []
    try:
        wheels = tuple(Wheel(str(w["file"]), str(w["sha256"]), int(w["bytes"]), str(w["part"])) for w in entries)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: each wheel needs file, sha256, bytes and part ({error!r} missing)") from None
    if not wheels:
        raise ValueError(f"{path} lists no wheel")
    names = [w.file for w in wheels]
    if len(set(names)) != len(names) or any(not n.endswith(".whl") for n in names):
        raise ValueError(f"{path}: wheel files must be distinct .whl names")
    tokenizer = spec.get("tokenizer") or {}
    recipe = Recipe(
        name=str(spec.get("name", path.stem)),
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        wheels=tuple(sorted(wheels, key=lambda w: w.file)),
        seed=int(spec.get("seed", 0)),
        val_fraction=float(spec.get("val_fraction", 0.02)),
        max_file_bytes=int(spec.get("max_file_bytes", 1_000_000)),
        vocab_size=int(tokenizer.get("vocab_size", 8192)),
        tokenizer_sample_bytes=int(tokenizer.get("sample_bytes", 40_000_000)),
        part_max_mib=int(spec.get("part_max_mib", 60)),
        suffixes=tuple(spec.get("suffixes", (".py",))),
    )
    if not 0.0 < recipe.val_fraction < 1.0:
        raise ValueError(f"{path}: val_fraction must be in (0, 1), got {recipe.val_fraction}")
    for part, members in recipe.parts().items():
        size = sum(w.bytes for w in members)
        if size > recipe.part_max_mib * MIB:
            raise ValueError(f"{path}: part {part!r} holds {size / MIB:.1f} MiB of wheels, over {recipe.part_max_mib}")
    return recipe


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def locate_wheels(recipe: Recipe, dirs: Sequence[str | Path]) -> dict[str, Path]:
    """Each wheel of `recipe` found in `dirs` (or a part subdirectory of one), its sha256 checked; one error naming
    every missing wheel, or the first whose hash differs from the pin."""
    dirs = [Path(d) for d in dirs]
    found, missing = {}, []
    for wheel in recipe.wheels:
        candidates = [d / wheel.file for d in dirs] + [d / wheel.part / wheel.file for d in dirs]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(wheel.file)
            continue
        digest = sha256_file(path)
        if digest != wheel.sha256:
            raise ValueError(f"wheel {path} has sha256 {digest}, the recipe {recipe.path} pins {wheel.sha256}")
        found[wheel.file] = path
    if missing:
        where = ", ".join(str(d) for d in dirs) or "(no --wheels directory)"
        raise FileNotFoundError(
            f"{len(missing)} wheel(s) of {recipe.path} missing from {where}: {', '.join(missing)}; fetch them with "
            f"scripts/prepare_data.py --recipe {recipe.path} --download DIR"
        )
    return found


@dataclass
class Selection:
    """The files a recipe keeps (name -> sha256 of the raw bytes, in corpus order) and what it leaves out."""

    kept: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    too_large: list[str] = field(default_factory=list)
    blank: int = 0
    duplicates: int = 0

    def summary(self) -> dict:
        listing = "\n".join(self.kept).encode()
        contents = "".join(f"{name}\0{digest}\n" for name, digest in self.kept.items()).encode()
        return {
            "files": len(self.kept),
            "bytes": self.bytes,
            "file_list_sha256": hashlib.sha256(listing).hexdigest(),
            "content_sha256": hashlib.sha256(contents).hexdigest(),
            "excluded": {"too_large": self.too_large, "blank": self.blank, "duplicates": self.duplicates},
        }


def _members(recipe: Recipe, paths: dict[str, Path]) -> Iterator[tuple[str, bytes | None]]:
    """(document name, raw bytes) of each source member of the wheels, in corpus order; None for a member larger
    than `max_file_bytes` (never decompressed)."""
    for wheel in recipe.wheels:
        with zipfile.ZipFile(paths[wheel.file]) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith(recipe.suffixes)]
            for info in sorted(infos, key=lambda i: i.filename):
                too_large = info.file_size > recipe.max_file_bytes
                yield f"{wheel.file}/{info.filename}", None if too_large else archive.read(info)


def select_files(recipe: Recipe, paths: dict[str, Path]) -> Selection:
    """Walk the wheels once and decide which files make the corpus."""
    selection, seen = Selection(), set()
    for name, raw in _members(recipe, paths):
        if raw is None:
            selection.too_large.append(name)
            continue
        if not raw.strip():
            selection.blank += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            selection.duplicates += 1
            continue
        seen.add(digest)
        selection.kept[name] = digest
        selection.bytes += len(raw)
    return selection


def corpus_order(recipe: Recipe, selection: Selection) -> list[str]:
    """The kept files in the order they are written: shuffled by a seeded hash of their names, so that any stretch
    of a split (the first batches an evaluation reads) samples every wheel."""
    return sorted(selection.kept, key=lambda name: hashlib.sha256(f"order\0{recipe.seed}\0{name}".encode()).digest())


def recipe_documents(recipe: Recipe, paths: dict[str, Path], selection: Selection) -> Iterator[tuple[str, str]]:
    """(split, text) of each kept file, in `corpus_order`."""
    with ExitStack() as stack:
        archives = {w.file: stack.enter_context(zipfile.ZipFile(paths[w.file])) for w in recipe.wheels}
        for name in corpus_order(recipe, selection):
            wheel, member = name.split("/", 1)
            split = document_split(recipe.seed, Path(name), 0, recipe.val_fraction)
            yield split, decode_source(archives[wheel].read(member))


def tokenizer_sample(recipe: Recipe, paths: dict[str, Path], selection: Selection) -> Iterator[str]:
    """About `tokenizer_sample_bytes` of train-split text, chosen by a seeded hash of each name: what the BPE
    tokenizer is trained on (fast, and the same on every machine)."""
    fraction = min(1.0, recipe.tokenizer_sample_bytes / max(selection.bytes, 1))
    for name, raw in _members(recipe, paths):
        if name not in selection.kept:
            continue
        if document_split(recipe.seed, Path(name), 0, recipe.val_fraction) != "train":
            continue
        digest = hashlib.sha256(f"tokenizer\0{recipe.seed}\0{name}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
            yield decode_source(raw)


def recipe_source(recipe: Recipe, selection: Selection) -> dict:
    """What the meta records of a corpus built from `recipe`."""
    return {
        "kind": "recipe",
        "recipe": recipe.name,
        "recipe_file": recipe.path.name,
        "recipe_sha256": recipe.sha256,
        "wheels": {w.file: w.sha256 for w in recipe.wheels},
        "seed": recipe.seed,
        "max_file_bytes": recipe.max_file_bytes,
        "suffixes": list(recipe.suffixes),
        "order": "sha256 of (seed, name)",
        **selection.summary(),
    }


def download_wheels(recipe: Recipe, out_dir: str | Path) -> dict[str, Path]:
    """Fetch the recipe's wheels with pip (`pip download --no-deps`, each pinned by its hash) into
    `out_dir/<part>/`, then check them as `locate_wheels` does."""
    out_dir = Path(out_dir)
    for part, wheels in recipe.parts().items():
        target = out_dir / part
        target.mkdir(parents=True, exist_ok=True)
        needed = [w for w in wheels if not (target / w.file).is_file()]
        if needed:
            requirements = target / "requirements.txt"
            requirements.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in needed))
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
            subprocess.run([*command, "-d", str(target), "-r", str(requirements)], check=True)
            requirements.unlink()
    return locate_wheels(recipe, [out_dir])


def prepare_recipe(
    out_dir: str | Path,
    recipe: str | Path | Recipe,
    wheel_dirs: Sequence[str | Path],
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Build the corpus of `recipe` from its wheels (found in `wheel_dirs`, hashes checked) into `out_dir`, in the
    token-file format of `prepare_corpus`. Without a `tokenizer`, a BPE one (`vocab_size`, by default the recipe's)
    is trained on the recipe's seeded sample of the train split. Returns the metadata."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    paths = locate_wheels(recipe, wheel_dirs)
    selection = select_files(recipe, paths)
    if progress:
        print(f"{recipe.name}: {len(selection.kept):,} files, {selection.bytes / 1e6:,.1f} MB of source", flush=True)
    if tokenizer is None:
        tokenizer = BPETokenizer.train(tokenizer_sample(recipe, paths, selection), vocab_size or recipe.vocab_size)
    return write_corpus(
        out_dir,
        tokenizer,
        recipe_documents(recipe, paths, selection),
        recipe_source(recipe, selection),
        recipe.val_fraction,
        workers=workers,
        progress=progress,
    )
