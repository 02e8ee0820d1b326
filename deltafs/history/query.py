"""A path at a moment: tree entries, WHEN resolution, retention-pruned versions, cat."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

from deltafs.errors import EXIT_JOURNAL, EXIT_OK, EXIT_PARTIAL, CorruptionError, NotFoundError, UsageError
from deltafs.history.format import iso_time, show_path
from deltafs.journal import KIND_DIR, KIND_FILE, KIND_SYMLINK, Reader, TreeEntry, tree_entry
from deltafs.names import show_name
from deltafs.when import Point, parse_when, resolve_when


# --- resolving a path at a moment --------------------------------------------------
def path_seen(r: Reader, rel: bytes) -> bool:
    return rel == b"" and r.head_seq() > 0 or bool(r.versions_under(rel))


def entry_at(r: Reader, rel: bytes, seq: int) -> TreeEntry | None:
    """The tree entry at ``rel`` right after record ``seq`` (None: absent)."""
    if seq >= r.head_seq():
        fid = r.file_id_at(rel) if rel else None
        if fid is None:
            return root_entry() if rel == b"" else None
        return tree_entry(rel, fid, r.file_state(fid))
    e = r.tree_at(seq, prefix=rel).get(rel)
    return e if e is not None or rel != b"" else root_entry()


def root_entry() -> TreeEntry:
    return TreeEntry(b"", KIND_DIR, 0, 0, 0, None, None, None, None, None, None, {}, None)


def missing_error(r: Reader, rel: bytes, seq: int) -> NotFoundError:
    name = show_name(rel)
    seqs = r.versions_under(rel)
    if not seqs:
        return NotFoundError(f"{name}: never seen in this journal")
    if seq >= r.head_seq():
        return NotFoundError(f"{name} does not exist now (last change in version {seqs[0]}); "
                             "give --at or --version to name a moment it existed")
    first = seqs[-1]
    if seq < first:
        return NotFoundError(f"{name} did not exist yet at version {seq} (first seen in version {first})")
    return NotFoundError(f"{name} did not exist at version {seq}")


@contextmanager
def reading(rel: bytes, seq: int | None = None) -> Iterator[None]:
    """Name PATH (and the version asked for) in a CorruptionError that does
    not name a file version itself (a damaged record block met while the
    tree at a moment is rebuilt, say)."""
    try:
        yield
    except CorruptionError as e:
        if e.path is not None:  # named already
            raise
        if seq is not None:
            raise CorruptionError(e.detail, rel, seq) from e
        err = CorruptionError(f"{show_name(rel)}: {e.detail}")
        err.path = rel
        raise err from e


# --- pruned versions (docs/format.md "Compaction and retention") ----------------------
def pruned_seqs(r: Reader) -> set[int]:
    return r.pruned_seqs()


def is_pruned(r: Reader, seq: int) -> bool:
    return bool(seq) and r.is_pruned(seq)


def _retained_of(r: Reader, file_id: int) -> list[int]:
    """Retained content versions of a file, newest first."""
    pruned = pruned_seqs(r)
    return [s for s in r.versions_of(file_id) if s not in pruned and r.record(s).is_content]


@dataclass(frozen=True)
class Thinned:
    """A file given at an earlier version than the one asked for: retention
    pruned ``asked`` (the version the file had at that moment) and ``given``
    is the latest retained version at or before it."""

    path: bytes
    asked: int
    given: int
    side: str | None = None  # diff: "from" or "to"

    def to_dict(self) -> dict:
        d = {"path": show_path(self.path), "asked": self.asked, "given": self.given}
        if self.side:
            d["side"] = self.side
        return d


def thinned_note(thinned: list[Thinned], nearest: bool, verb: str = "given") -> str:
    """The one stderr line saying that (and how many) files were given at an
    earlier retained version than asked."""
    if len(thinned) == 1:
        t = thinned[0]
        what = (f"{show_name(t.path)} {verb} at version {t.given} instead of {t.asked}, which retention "
                f"pruned ({t.given} is the latest version of it retained before that)")
    else:
        what = (f"{len(thinned)} files {verb} at an earlier version than asked: retention pruned the "
                "versions they had then, so the latest retained version before each was used (--json "
                "lists them)")
    return what if nearest else what + "; exit status 1 (--nearest accepts this)"


def outcome_code(*, corrupt: bool = False, failed: bool = False, thinned: bool = False,
                 nearest: bool = False) -> int:
    """Exit status of a history read: 3 when anything read was corrupt (it wins),
    1 (partial) for other failures or, without ``--nearest``, for thinned files."""
    if corrupt:
        return EXIT_JOURNAL
    if failed or (thinned and not nearest):
        return EXIT_PARTIAL
    return EXIT_OK


def pruned_error(r: Reader, rel: bytes, seq: int, file_id: int) -> NotFoundError:
    """"version N of PATH was pruned by retention on ...; no earlier version is retained"."""
    info = r.pruned_info(seq) or {}
    on = f" on {iso_time(info['t'], table=True)}" if info.get("t") else ""
    later = [s for s in _retained_of(r, file_id) if s > seq]
    nxt = f" (the next retained one is version {min(later)})" if later else ""
    return NotFoundError(f"version {seq} of {show_name(rel)} was pruned by retention{on} and no "
                         f"earlier version of it is retained{nxt}")


def retained_entry(r: Reader, rel: bytes, e: TreeEntry, thinned: list[Thinned] | None = None,
                   side: str | None = None) -> TreeEntry:
    """``e`` with a pruned content version replaced by the latest retained one
    at or before it, and the substitution added to ``thinned``.  NotFoundError
    when no earlier version of the file is retained."""
    if e.kind != KIND_FILE or not e.content_seq or not is_pruned(r, e.content_seq):
        return e
    older = [s for s in _retained_of(r, e.file_id) if s < e.content_seq]
    if not older:
        raise pruned_error(r, rel, e.content_seq, e.file_id)
    if thinned is not None:
        thinned.append(Thinned(rel, e.content_seq, older[0], side))
    return replace(e, content_seq=older[0], size=r.record(older[0]).size or 0)


def resolve_point(r: Reader, at: str | None = None, version: str | None = None,
                  now_ns: int | None = None) -> Point:
    """--at WHEN / --version ID (at most one) -> Point; neither: the head."""
    if at is not None and version is not None:
        raise UsageError("give either --at or --version, not both")
    if version is not None:
        w = parse_when(version, now_ns)
        if w.seq is None:
            raise UsageError(f"--version takes a version id (123, v123 or @123), not {version!r}")
        return resolve_when(r, w, now_ns)
    return resolve_when(r, at if at is not None else "now", now_ns)


def _content_entry(r: Reader, rel: bytes, point: Point, thinned: list[Thinned] | None) -> TreeEntry:
    """The file entry at ``rel`` at ``point``; a content record of ``rel``
    named by --version is used directly (no tree replay)."""
    if point.when.seq is not None:
        rec = r.record(point.seq)
        if rec.is_content and rec.path == rel and r.file_state(rec.file_id):
            e = TreeEntry(rel, KIND_FILE, rec.file_id, rec.seq, rec.size or 0, None, None, None,
                          None, None, None, {}, None)
            return retained_entry(r, rel, e, thinned)
    e = entry_at(r, rel, point.seq)
    if e is None:
        raise missing_error(r, rel, point.seq)
    return retained_entry(r, rel, e, thinned)


def path_seqs(r: Reader, rel: bytes, follow: bool = True) -> list[int] | None:
    """Newest-first seqs of PATH's history (None: the root, i.e. everything).

    Without ``follow``: the records that name PATH or a path below it, i.e.
    exactly what that path held.  With ``follow`` a file's history across
    renames is added (``git log --follow``): every record of the file now
    at PATH, or of the file that last had PATH if nothing is there now."""
    if rel == b"":
        return None
    seqs = set(r.versions_under(rel))
    if not follow:
        return sorted(seqs, reverse=True)
    fid = r.file_id_at(rel)
    if fid is None and seqs:
        last = r.record(max(seqs))
        fid = last.file_id if rel in (last.path, last.path2) else None
    if fid is not None:
        st = r.file_state(fid)
        if st is not None and st.kind != KIND_DIR:
            seqs.update(r.versions_of(fid))
    return sorted(seqs, reverse=True)


# --- cat ------------------------------------------------------------------------------
def cat_source(r: Reader, rel: bytes, at: str | None = None, version: str | None = None,
               now_ns: int | None = None, thinned: list[Thinned] | None = None
               ) -> tuple[TreeEntry, Iterator[bytes]]:
    """-> (entry, chunks of its content) of PATH at --at/--version (default: now).

    The chunks are verified before each is yielded (``Reader.iter_content``);
    a pruned version gives the latest retained one before it, added to ``thinned``."""
    with reading(rel):
        point = resolve_point(r, at, version, now_ns)
    with reading(rel, point.seq):
        e = _content_entry(r, rel, point, thinned)
    if e.kind == KIND_DIR:
        raise UsageError(f"{show_name(rel)} is a directory (use 'deltafs log' or 'deltafs restore')")
    if e.kind == KIND_SYMLINK:
        raise UsageError(f"{show_name(rel)} is a symlink to {show_name(e.target)}")
    if e.kind != KIND_FILE:
        raise UsageError(f"{show_name(rel)} is a special file, it has no content")
    return e, (_named_chunks(rel, e.content_seq, r.iter_content(e.content_seq)) if e.content_seq
               else iter(()))


def _named_chunks(rel: bytes, seq: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
    with reading(rel, seq):
        yield from chunks
