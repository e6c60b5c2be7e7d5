"""The package's import structure, read from the source (ast): layers never import the packages built on them,
modules import each other without cycles, and imports inside functions are kept for optional or heavy
dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moeformer"
UPPER = ("moeformer.models", "moeformer.parallel", "moeformer.training")
LEVELS = (
    "moeformer",
    "moeformer.layers",
    "moeformer.models",
    "moeformer.parallel",
    "moeformer.training",
    "moeformer.serving",
)
# imported where used: optional extras (fla, tokenizers, pyarrow, tensorboard, torchao), parts of torch that cost
# seconds to import (dynamo, FlexAttention, the profiler), Unix-only modules; DeepSpeed (whose import probes the
# accelerator) only where a module must not pull it in (the checkpoint readers' allow-list, reached from
# `import moeformer`) or does once per call
LAZY_ALLOWED = (
    "fla",
    "tokenizers",
    "torchao",
    "pyarrow",
    "torch.utils.tensorboard",
    "torch._dynamo",
    "torch.profiler",
    "torch.nn.attention.flex_attention",
    "resource",
)
LAZY_DEEPSPEED = ("moeformer.safe_files", "moeformer.parallel.expert")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules `node` imports (a `from package import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at module level, [(line, module) imported inside a function or class])."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = {
        name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in _imported(module, path, node)
    }
    inner = [
        (node.lineno, name)
        for scope in ast.walk(tree)
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for node in ast.walk(scope)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in _imported(module, path, node)
    ]
    return top, inner


def _level(module: str) -> int:
    """Position of `module`'s package in LEVELS (root modules such as errors and safe_files: 0)."""
    return max(i for i, package in enumerate(LEVELS) if module == package or module.startswith(package + "."))


def test_layers_import_no_upper_package():
    bad = [
        f"{m} imports {name}"
        for m in MODULES
        if m.startswith("moeformer.layers")
        for name in (_imports(m)[0] | {n for _, n in _imports(m)[1]})
        if name.startswith(UPPER)
    ]
    assert not bad, bad


def test_each_package_imports_only_those_below_it():
    """errors / safe_files < layers < models < parallel < training < serving (docs/ARCHITECTURE.md)."""
    bad = [
        f"{m} imports {name}"
        for m in MODULES
        if m != "moeformer"
        for name in (_imports(m)[0] | {n for _, n in _imports(m)[1]})
        if name.startswith("moeformer.") and _level(name) > _level(m)
    ]
    assert not bad, bad


def test_no_import_cycle():
    graph = {m: {n for n in _imports(m)[0] if n in MODULES and n != m} for m in MODULES}
    # a package imports its own submodules in __init__; a submodule importing its package's __init__ is a cycle
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_function_level_imports_are_optional_dependencies():
    allowed = lambda m, name: any(
        name == lazy or name.startswith(lazy + ".")
        for lazy in LAZY_ALLOWED + (("deepspeed",) if m in LAZY_DEEPSPEED else ())
    )
    bad = [f"{m}:{line} imports {name}" for m in MODULES for line, name in _imports(m)[1] if not allowed(m, name)]
    assert not bad, bad


@pytest.mark.parametrize("module", ["moeformer.models.config", "moeformer.layers.mla"])
def test_the_checks_see_imports(module):
    """The parser finds the imports it checks (a test that always passes would check nothing)."""
    top, _ = _imports(module)
    assert any(name.startswith("moeformer.layers") for name in top)
    levels = (
        "moeformer.errors",
        "moeformer.layers.mla",
        "moeformer.models",
        "moeformer.parallel.tensor",
        "moeformer.training.trainer",
    )
    assert [_level(m) for m in levels] == [0, 1, 2, 3, 4]
