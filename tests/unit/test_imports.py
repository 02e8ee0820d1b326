"""Imports point down only (STYLE.md): the layers stay separable."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "deltafs"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def module_files(*names: str):
    for name in names:
        p = PKG / name
        yield from (sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")])


@pytest.mark.parametrize("path", list(module_files("journal", "chunking")), ids=str)
def test_journal_and_chunking_never_import_trio_or_fuse(path):
    bad = {m for m in imports_of(path) if m.split(".")[0] in ("trio", "pyfuse3")}
    assert not bad, f"{path.name} imports {bad}"


def test_ops_knows_only_the_recorder_not_the_journal():
    bad = {m for m in imports_of(PKG / "ops.py")
           if m.startswith(("deltafs.journal", "deltafs.mirrors", "deltafs.capture", "lmdb"))}
    assert not bad, f"ops.py imports {bad}"


@pytest.mark.parametrize("path", list(module_files("journal", "chunking", "history", "mirrors")), ids=str)
def test_lower_layers_never_import_the_cli_or_the_mount(path):
    bad = {m for m in imports_of(path) if m.startswith(("deltafs.cli", "deltafs.mount", "deltafs.ops"))}
    assert not bad, f"{path.name} imports {bad}"


def test_only_the_mirror_crypto_module_imports_cryptography():
    """Ciphers, KDF and key wrapping live in deltafs/mirrors/crypto.py alone (docs/design.md)."""
    users = sorted(p.name for p in PKG.rglob("*.py")
                   if any(m.split(".")[0] in ("cryptography", "argon2") for m in imports_of(p)))
    assert users == ["crypto.py"], users
