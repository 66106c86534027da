"""The package's layering, read from the import statements: the pure method knows nothing of
processes, data and models know nothing of engines or recipes, the library never imports the
tools, and the parallel context cannot change once built."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from alsace_ds.parallel import ParallelContext

PKG = Path(__file__).resolve().parent.parent / "alsace_ds"

# subpackage -> what it must not import (module prefixes)
FORBIDDEN = {
    "method": ("torch.distributed", "deepspeed", "alsace_ds.parallel", "alsace_ds.engine",
               "alsace_ds.recipes", "alsace_ds.reporting", "alsace_ds.data", "alsace_ds.models"),
    "data": ("torch.distributed", "alsace_ds.engine", "alsace_ds.recipes", "alsace_ds.reporting"),
    "models": ("torch.distributed", "alsace_ds.engine", "alsace_ds.recipes", "alsace_ds.reporting"),
    "engine": ("alsace_ds.recipes", "alsace_ds.reporting"),
    "reporting": ("torch.distributed", "alsace_ds.engine", "alsace_ds.recipes"),
}  # fmt: skip


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_relative_imports():
    """The checks below read absolute imports only: a relative one would pass them unseen."""
    bad = [
        f"{p.relative_to(PKG)}:{node.lineno}"
        for p in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert bad == []


def _hits(found: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in found if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_subpackage_imports_only_below_it(sub):
    bad = {
        str(p.relative_to(PKG)): hits
        for p in sorted((PKG / sub).rglob("*.py"))
        if (hits := _hits(imports(p), FORBIDDEN[sub]))
    }
    assert bad == {}


def test_the_library_never_imports_the_tools():
    bad = {
        str(p.relative_to(PKG)): hits
        for p in sorted(PKG.rglob("*.py"))
        if p.relative_to(PKG).parts[0] not in ("tools", "train.py", "experiment.py")  # entry points
        if (hits := _hits(imports(p), ("alsace_ds.tools",)))
    }
    assert bad == {}


def test_parallel_context_is_frozen():
    ctx = ParallelContext(rank=1, world_size=4, view_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.view_size = 1  # type: ignore[misc]
    assert (ctx.view_rank, ctx.dp_rank, ctx.dp_world) == (1, 0, 2)
