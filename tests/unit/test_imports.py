"""The module boundaries docs/design.md and STYLE.md claim, kept true.

Every rule here parses the source (``ast``): imports anywhere in a module
(also the ones inside functions), attribute reads, nothing is imported or
run.  Where today's code outside the journal still breaks a rule, the
test carries an explicit allowlist of exactly those cases, so any *new*
violation fails; the restructurings that remove a case empty its entry
(an entry that no longer matches fails too, so the lists only shrink).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "deltafs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _package(mod: str) -> str:
    return mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]


def import_edges(mod: str) -> set[str]:
    """deltafs modules (and third-party top-level names) ``mod`` imports, anywhere in it."""
    out = set()
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(mod).split(".")
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            for a in node.names:  # `from pkg import module` names the module
                out.add(f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src)
    return out


def deltafs_edges(mod: str) -> set[str]:
    return {m for m in import_edges(mod) if m in MODULES and m != mod}


def module_files(*names: str):
    for name in names:
        p = PKG / name
        yield from (sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")])


def imports_of(path: Path) -> set[str]:
    return import_edges(module_name(path))


# --- the layer order -------------------------------------------------------------------------
# Top to bottom, module by module (docs/design.md, "Layers"; STYLE.md "Imports
# point down only").  A module imports only modules of lower layers; inside a
# package, see PACKAGE_LAYERS.  The package faces (deltafs, deltafs.mirrors,
# deltafs.journal) stand with their package.
LAYERS = [
    ["deltafs.__main__"],
    ["deltafs.cli"],
    ["deltafs.mount"],  # the one wiring point
    ["deltafs.services"],  # the daemon and its services' typed handles
    ["deltafs.metrics"],
    ["deltafs.status"],
    ["deltafs.control"],
    ["deltafs.historyview"],  # the history view inside a live mount (uses pastfs's trees)
    ["deltafs.pastfs"],  # mount --at: a read-only view built from history
    ["deltafs.sync"],  # sync groups: publish, pull and apply over capture, mirrors, journal
    ["deltafs.history"],  # log, cat, diff, restore (a journaled restore takes capture's identity rule)
    # services and tools: the FUSE side, capture, compaction, mirrors
    ["deltafs.ops", "deltafs.capture", "deltafs.maintenance", "deltafs.mirrors",
     "deltafs.locate", "deltafs.snapshots"],
    ["deltafs.journal", "deltafs.mounttable", "deltafs.when", "deltafs.config", "deltafs.ignore",
     "deltafs.guard"],
    ["deltafs.chunking", "deltafs.errors"],
    ["deltafs.names", "deltafs._syscalls", "deltafs.fdcache", "deltafs.hops", "deltafs.heap", "deltafs"],
    ["deltafs.trace"],  # DELTAFS_TRACE stage stamps: imported by every layer, imports none
]

# inside a package: its modules' own order (the package face may import any of them)
PACKAGE_LAYERS = {
    "deltafs.journal": [  # deltafs/journal/core.py's docstring
        ["core"],  # Journal: the writer, the public face
        ["compact", "verify"],  # the Compactor; verify
        ["recode"],  # compaction's re-coding of chunk values
        ["planstate"],  # compaction's planning state
        ["reader", "storage"],  # Reader; Storage: env, every db, packs, lock (the lmdb owner)
        ["checkpoints"],  # tree checkpoints (format 7): the replay state every few thousand records
        ["upgrade", "state", "private", "hlc"],
        ["packs", "records", "seqindex"],  # seqindex: history/pathlog segments and duplicates (format 13)
        ["schema"],
    ],
    "deltafs.capture": [  # deltafs/capture/__init__.py re-exports the public names
        ["recorder"],  # the Recorder: ops' hooks, record emission, the scan at mount time
        ["pipeline", "content", "saves"],  # ordered queue + group commit; content versions; rename rules
        ["identity", "state"],  # paths that just lost their file (the reuse window); a node's capture state
    ],
    "deltafs.history": [  # deltafs/history/__init__.py re-exports every public name
        ["restore"],  # restore, rollback (writes, journals a restore into SRC)
        ["log", "diff"],  # log / saves; diff of a file or a tree
        ["query"],  # a path at a moment: entries, WHEN, pruned versions, cat
        ["format"],  # text and JSON output
    ],
}

# Upward imports that exist today, each a later restructuring's to remove.
UPWARD_ALLOWED: set[tuple[str, str]] = set()


def layer_of(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(mod == top or (top != "deltafs" and mod.startswith(top + ".")) for top in layer):
            return i
    raise AssertionError(f"{mod} is in no layer of test_imports.LAYERS: place it there")


def package_of(mod: str) -> str | None:
    """The subpackage a module belongs to (a face belongs to its own), None at the top."""
    if MODULES[mod].name == "__init__.py":
        return mod if mod != "deltafs" else None
    parent = mod.rpartition(".")[0]
    return parent if parent != "deltafs" else None


def package_rank(pkg: str, mod: str) -> int:
    short = mod.rpartition(".")[2]
    for i, layer in enumerate(PACKAGE_LAYERS[pkg]):
        if short in layer:
            return i
    raise AssertionError(f"{mod} is in no layer of test_imports.PACKAGE_LAYERS[{pkg!r}]: place it there")


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)
        pkg = package_of(mod)
        if pkg in PACKAGE_LAYERS and mod != pkg:
            package_rank(pkg, mod)


def upward_imports() -> set[tuple[str, str]]:
    """(importer, imported) pairs that do not point down."""
    found = set()
    for mod in MODULES:
        for dep in deltafs_edges(mod):
            pkg = package_of(mod)
            if pkg is not None and pkg == package_of(dep):  # inside one package
                if pkg in PACKAGE_LAYERS and pkg not in (mod, dep) and \
                        package_rank(pkg, dep) <= package_rank(pkg, mod):
                    found.add((mod, dep))
            elif dep != "deltafs" and layer_of(dep) <= layer_of(mod):
                found.add((mod, dep))
    return found


def test_imports_point_down_only():
    found = upward_imports()
    assert found - UPWARD_ALLOWED == set(), "imports that point up or sideways (STYLE.md)"
    assert UPWARD_ALLOWED - found == set(), "allowlisted imports that are gone: remove them from UPWARD_ALLOWED"


# --- no cycles -----------------------------------------------------------------------------------
CYCLES_ALLOWED: set[frozenset[str]] = set()


def import_cycles() -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: deltafs_edges(m) - {_package(m)} for m in MODULES}  # a module's own face is no edge
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    found = import_cycles()
    assert found - CYCLES_ALLOWED == set(), "modules that import each other"
    assert CYCLES_ALLOWED - found == set(), "allowlisted cycles that are gone: remove them"


# --- public names only across modules -------------------------------------------------------------
# Attribute names with a leading underscore that are public API of the standard library.
STDLIB_UNDERSCORE = {"_exit", "_replace", "_asdict", "_fields", "_make", "_getframe"}

PRIVATE_ALLOWED: set[tuple[str, str]] = set()


def _defined_here(tree: ast.AST) -> set[str]:
    """Names a module defines itself: functions, classes, assigned names and attributes."""
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and \
                isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            names.add(n.attr)  # (``other._x = 1`` defines nothing: it reaches into other's)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in STDLIB_UNDERSCORE


def private_uses(mod: str) -> list[tuple[int, str]]:
    """(line, name) of every private name ``mod`` takes from another module.

    * ``from x import _y`` (a module ``x._y`` is fine: a package's internal
      module, imported inside the package);
    * ``obj._y`` where obj is not ``self``/``cls`` and ``_y`` is nothing
      this module defines (so it is another module's attribute);
    * ``getattr(obj, "_y")`` and friends, likewise.
    """
    tree = TREES[mod]
    own = _defined_here(tree)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            src = module_name(MODULES[mod]) if n.level else n.module
            for a in n.names:
                if _private(a.name) and not any(k.endswith("." + a.name) for k in MODULES):
                    out.append((n.lineno, a.name))
        elif isinstance(n, ast.Attribute) and _private(n.attr):
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            if n.attr not in own:
                out.append((n.lineno, n.attr))
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and \
                n.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(n.args) >= 2:
            arg = n.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _private(arg.value) \
                    and arg.value not in own:
                out.append((n.lineno, arg.value))
    return out


def test_no_private_names_across_modules():
    """STYLE.md: a module uses another's public names only; if a neighbour
    needs a private attribute, the owner grows a method."""
    found = {(mod, name): line for mod in MODULES for line, name in private_uses(mod)}
    new = {f"{MODULES[m].relative_to(PKG.parent)}:{line}: {name}" for (m, name), line in found.items()
           if (m, name) not in PRIVATE_ALLOWED}
    assert not new, "private names used across modules"
    assert PRIVATE_ALLOWED - set(found) == set(), "allowlisted uses that are gone: remove them"


def test_the_private_name_check_catches_what_it_claims():
    """The AST check itself, on code written to break each rule."""
    src = ("from deltafs.journal.core import _new_id\n"
           "import deltafs.journal as J\n"
           "def f(j, r):\n"
           "    j._dbs.get(1); r._j; getattr(j, '_wlock')\n"
           "class A:\n"
           "    def g(self, other):\n"
           "        self._x = 1; return other._x, self._y\n")
    TREES["deltafs.__probe__"] = ast.parse(src)
    MODULES["deltafs.__probe__"] = PKG / "__probe__.py"
    try:
        assert sorted(name for _, name in private_uses("deltafs.__probe__")) == \
            ["_dbs", "_j", "_new_id", "_wlock"]
    finally:
        del TREES["deltafs.__probe__"], MODULES["deltafs.__probe__"]


# --- the journal owns LMDB ---------------------------------------------------------------------------
def test_lmdb_is_imported_only_by_the_journals_storage():
    """docs/design.md: the journal is the only LMDB owner; inside it, Storage
    (journal/storage.py) is the one module that touches lmdb itself."""
    users = sorted(str(MODULES[m].relative_to(PKG.parent)) for m in MODULES if "lmdb" in import_edges(m))
    assert users == ["deltafs/journal/storage.py"], users


def test_outside_the_journal_only_its_face_is_imported():
    """Callers import ``deltafs.journal`` (its __init__ exports what they
    need), never its internal modules."""
    bad = {(m, dep) for m in MODULES if not m.startswith("deltafs.journal")
           for dep in deltafs_edges(m) if dep.startswith("deltafs.journal.")}
    assert not bad, bad


def test_no_lmdb_handles_outside_the_journal():
    """A Reader's transaction and database handles stay inside the journal."""
    bad = [(str(MODULES[m].relative_to(PKG.parent)), n.lineno, n.attr) for m in MODULES
           if not m.startswith("deltafs.journal") for n in ast.walk(TREES[m])
           if isinstance(n, ast.Attribute) and n.attr in ("txn", "dbs")]
    assert not bad, bad


def test_the_journal_package_exports_what_it_documents():
    import deltafs.journal as J

    assert sorted(J.__all__) == sorted(set(J.__all__)) and all(hasattr(J, n) for n in J.__all__)
    doc_methods = {"prune", "repack", "archive_records", "densify_index", "vacuum", "data_bytes",
                   "verify", "commit", "commit_many", "put_chunks", "append_raw", "reader", "close"}
    assert all(callable(getattr(J.Journal, m)) for m in doc_methods)
    assert not any(hasattr(J.Journal, m) for m in ("start_writer", "submit", "stop_writer"))


# --- narrower rules ------------------------------------------------------------------------------------
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
