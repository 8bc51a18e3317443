"""The layout is the architecture: each part imports only the parts below it.

Every import in the package is parsed (module level and inside functions; not those under
``if TYPE_CHECKING:``, which never run) and checked against ``ALLOWED``, the table in
ARCHITECTURE.md. A forbidden arrow fails with the file, line and the import that broke it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "embedstore"

LEAVES = {"errors", "arrays", "sizes"}
# part -> the parts it may import (besides itself). The store is the foundation.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "arrays": set(),
    "sizes": {"errors"},
    "store": LEAVES,
    "backbones": LEAVES,
    "plots": LEAVES | {"store"},
    "extract": LEAVES | {"store", "backbones", "plots"},
    "index": LEAVES | {"store", "plots"},
    "heads": LEAVES | {"store", "plots"},
    "select": LEAVES | {"store", "backbones", "extract", "heads", "plots"},
    "serve": LEAVES | {"store", "backbones", "extract", "index", "heads", "plots"},
    "interop": LEAVES | {"store", "heads", "index", "extract", "plots"},
    "cli": LEAVES | {"store", "backbones", "extract", "index", "heads", "select", "serve", "plots",
                     "interop"},
    "__init__": {"store", "errors"},
    "__main__": {"cli"},
}
# private modules of the store that no other part may reach into
STORE_PRIVATE = {"catalog", "commit", "_process", "_shardfile", "_openshard", "_checksum", "_pending",
                 "snapshot", "creation"}


def _part(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "embedstore", module
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names = names[:-1]
    return ".".join(names)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        lines.add(n.lineno)
    return lines


def imports_of(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """(line, absolute module) for every embedstore import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    here = _module_of(path, pkg)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "embedstore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "embedstore":
                continue
            if mod == "embedstore" or (node.module is None and node.level):
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]   # from . import x
            else:
                out.append((node.lineno, mod))
    return out


def violations(pkg: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        src_part = _part(_module_of(path, pkg))
        allowed = ALLOWED.get(src_part)
        for line, mod in imports_of(path, pkg):
            dst_part = _part(mod)
            where = f"{path.relative_to(pkg.parent)}:{line}"
            if allowed is None:
                bad.append(f"{where}: part {src_part!r} is not in the architecture table")
            elif dst_part != src_part and dst_part not in allowed:
                bad.append(f"{where}: {src_part} must not import {mod} ({dst_part})")
            elif (dst_part == "store" and src_part != "store"
                  and len(mod.split(".")) > 2 and mod.split(".")[2] in STORE_PRIVATE):
                bad.append(f"{where}: {src_part} reaches into the store's private {mod}")
    return bad


def test_no_forbidden_import() -> None:
    bad = violations()
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_nothing_imports_the_cli() -> None:
    for path in PKG.rglob("*.py"):
        if _part(_module_of(path)) in ("cli", "__main__"):
            continue
        assert not [m for _, m in imports_of(path) if _part(m) == "cli"], path


def test_the_checker_catches_a_forbidden_arrow(tmp_path: Path) -> None:
    """The rule test can fail: a store module importing the index, a heads module importing
    the CLI, a lazy import inside a function and a reach into store.catalog are all reported."""
    pkg = tmp_path / "embedstore"
    for d in ("store", "heads", "index", "cli"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "store" / "reader.py").write_text("from ..index.search import search\n")
    (pkg / "heads" / "train.py").write_text("def f():\n    from embedstore.cli import main\n")
    (pkg / "index" / "build.py").write_text("from ..store.catalog import open_catalog\n"
                                            "from typing import TYPE_CHECKING\n"
                                            "if TYPE_CHECKING:\n    from ..heads import train\n")
    found = "\n".join(violations(pkg))
    assert "store must not import embedstore.index.search" in found
    assert "heads must not import embedstore.cli" in found
    assert "private embedstore.store.catalog" in found
    assert "embedstore.heads" not in found          # TYPE_CHECKING imports never run


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_every_module_has_a_part(path: Path) -> None:
    assert _part(_module_of(path)) in ALLOWED, f"{path}: add its part to ALLOWED and ARCHITECTURE.md"
