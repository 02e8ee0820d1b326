"""Tree checkpoints (format 7): a tree from a checkpoint equals a full replay.

Random histories of creates, mkdirs, writes, hard links, renames (of files
and of directories with their contents), exchanges, unlinks, rmdirs,
attribute and xattr changes, and prunes of old content versions; tree
checkpoints written every few records while the history grows (full ones
and deltas).  At every seq the tree from ``Reader.tree_at`` (nearest
checkpoint + records after it) must equal the tree of a replay from record 1,
``Reader.entry_at`` must give each path's entry, and ``Reader.tree_changes``
must name every path that differs between two moments, with the right
entries.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from deltafs import chunking
from deltafs.journal import Change, Journal, MemStore, apply_record, checkpoints, tree_entry
from deltafs.journal import schema as S

NAMES = [b"a", b"b", b"c", b"d/x", b"d/y", b"e", b"e/z", b"d"]


def full_replay(r, seq: int) -> dict:
    m = MemStore()
    for rec in r.records(1, seq):
        apply_record(m, rec)
    return {p: tree_entry(p, fid, m.files[fid]) for p, (fid, _) in sorted(m.paths.items())}


op_st = st.tuples(
    st.sampled_from(["create", "mkdir", "write", "write", "link", "rename", "exchange", "unlink",
                     "rmdir", "setattr", "setxattr", "removexattr", "prune", "checkpoint"]),
    st.sampled_from(NAMES), st.sampled_from(NAMES), st.integers(0, 3),
)


def _change(op: str, p: bytes, q: bytes, n: int, versions: dict) -> list[Change]:
    if op in ("create", "mkdir"):
        return [Change(op=op, path=p, mode=0o100644 if op == "create" else 0o40755, mtime_ns=n)]
    if op == "write":
        data = b"%s %d" % (p, n)
        cid, chunk = chunking.chunk_id(data), chunking.build_chunk(data)
        base = versions.get(p, 0)
        old = 1 if base else 0
        return [Change(op="write", path=p, size=len(data), cause="write", base_seq=base,
                       edit=[(0, old, [(cid, len(data))])], chunks=[chunk])]
    if op == "link":
        return [Change(op="link", path=p, path2=q)]
    if op in ("rename", "exchange"):
        return [Change(op="rename", path=p, path2=q, flags=2 if op == "exchange" else None)]
    if op in ("unlink", "rmdir"):
        return [Change(op=op, path=p)]
    if op == "setattr":
        return [Change(op="setattr", path=p, mode=0o100600 + n, uid=n, mtime_ns=100 + n)]
    if op == "setxattr":
        return [Change(op="setxattr", path=p, xattr_name=b"user.%d" % n, xattr_value=b"v%d" % n)]
    return [Change(op="removexattr", path=p, xattr_name=b"user.%d" % n)]


def _prune_one(j: Journal) -> None:
    """Prune the oldest content version of a file that has a newer one."""
    with j.reader() as r:
        vs = r.content_versions()
    for versions in vs.by_file.values():
        if len(versions) > 1:
            doomed = versions[0][0]
            kept = [s for v in vs.by_file.values() for s, _ in v if s != doomed]
            j.prune([doomed], kept)
            return


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=70), every=st.integers(1, 9))
def test_tree_from_checkpoint_equals_full_replay(tmp_path_factory, ops, every):
    path = str(tmp_path_factory.mktemp("j") / "j")
    with Journal.open(path, create=True) as j:
        for op, p, q, n in ops:
            if op == "prune":
                _prune_one(j)
                continue
            if op == "checkpoint":
                checkpoints.write_due(j._storage, j.reader, every_records=every)
                continue
            with j.reader() as r:  # the version a write builds on: the path's current content
                fid = r.file_id_at(p)
                fs = r.file_state(fid) if fid else None
                versions = {p: fs.content_seq} if fs and fs.content_seq and not r.is_pruned(fs.content_seq) else {}
            try:
                j.commit(_change(op, p, q, n, versions))
            except Exception:  # noqa: BLE001 - a change the journal refuses (e.g. a pruned base) is no record
                pass
        checkpoints.write_due(j._storage, j.reader, every_records=every)
        with j.reader() as r:
            head = r.head_seq()
            cps = checkpoints.seqs(r)
            assert all(0 < s <= head for s in cps)
            trees = {s: full_replay(r, s) for s in range(0, head + 1)}
            for s in range(0, head + 1):
                assert r.tree_at(s) == trees[s], f"tree at {s} (checkpoints {cps})"
                assert r.tree_at(s, prefix=b"d") == {k: v for k, v in trees[s].items()
                                                     if k == b"d" or k.startswith(b"d/")}
                for name in NAMES:  # one path: the current index when nothing touched it since
                    assert r.entry_at(s, name) == trees[s].get(name), (s, name)
            for a in range(0, head + 1, 3):
                for b in (a, min(head, a + 5), head):
                    before, after = r.tree_changes(a, b)
                    ta, tb = trees[a], trees[b]
                    differ = {k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k)}
                    assert differ <= set(before) | set(after)
                    for k in set(before) | set(after):
                        assert before.get(k) == ta.get(k) and after.get(k) == tb.get(k), (a, b, k)


def test_checkpoints_full_and_delta_and_a_damaged_one_is_ignored(tmp_path):
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        for i in range(300):
            j.commit([Change(op="create", path=b"f%d" % (i % 50), mode=0o100644, mtime_ns=i)])
            if i % 7 == 0:
                j.commit([Change(op="rename", path=b"f%d" % (i % 50), path2=b"g%d" % i)])
        assert checkpoints.write_due(j._storage, j.reader, every_records=20) > 5
        with j.reader() as r:
            cps = checkpoints.seqs(r)
            kinds = [bytes(r.txn.get(S.u64(s), db=r.dbs[S.DB_TREES]))[1:2] for s in cps]
            assert kinds[0] == b"F" and b"D" in kinds
            want = full_replay(r, cps[3] + 5)
        # flip a byte of a checkpoint's body: it fails its check and is ignored
        with j._storage.write() as txn:
            v = bytearray(txn.get(S.u64(cps[3]), db=j._storage.dbs[S.DB_TREES]))
            v[-3] ^= 0xFF
            txn.put(S.u64(cps[3]), bytes(v), db=j._storage.dbs[S.DB_TREES])
        with j.reader() as r:
            assert r.tree_at(cps[3] + 5) == want
        # nothing more is due: no new checkpoint
        assert checkpoints.write_due(j._storage, j.reader, every_records=20) <= 1


def test_a_format_6_journal_gets_checkpoints_lazily(tmp_path):
    import lmdb
    from oldformat import downgrade_to_format_9

    path = str(tmp_path / "j")
    with Journal.open(path, create=True) as j:
        for i in range(50):
            j.commit([Change(op="mkdir", path=b"d%d" % i, mode=0o40755)])
    downgrade_to_format_9(path, 6)
    env = lmdb.open(path, max_dbs=S.MAX_DBS)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(S.DB_TREES, txn=txn), delete=True)
    env.close()
    with pytest.raises(Exception, match="format version 6"):
        Journal.open(path, readonly=True)
    with Journal.open(path) as j:
        assert j.format_version == S.FORMAT_VERSION  # 6 -> 7 -> 8 -> 9
        with j.reader() as r:
            assert checkpoints.seqs(r) == []
            assert len(r.tree_at()) == 50
        assert checkpoints.write_due(j._storage, j.reader, every_records=16) == 3
        with j.reader() as r:
            assert checkpoints.seqs(r) == [16, 32, 48]
            assert r.tree_at(40) == full_replay(r, 40)


def test_files_deleted_long_ago_are_kept_as_ids_only(tmp_path):
    """A full checkpoint keeps only the ids of files deleted more than two
    intervals before it (``gone``), so the state a checkpoint loads does not
    grow with every file ever deleted (the soak's atomic saves delete one a
    save).  A late write to such a file (unlinked while still open) still
    replays exactly as it did with the whole state kept (every tree from a
    checkpoint equals the full replay from record 1)."""

    def write(fid, path, n):
        data = b"%s %d" % (path, n)
        return Change(op="write", file_id=fid, path=path, size=len(data), cause="write", base_seq=0,
                      edit=[(0, 0, [(chunking.chunk_id(data), len(data))])], chunks=[chunking.build_chunk(data)])

    with Journal.open(str(tmp_path / "j"), create=True) as j:
        j.commit([Change(op="create", file_id=7, path=b"app.log", mode=0o100644)])
        j.commit([write(7, b"app.log", 0)])
        j.commit([Change(op="unlink", file_id=7, path=b"app.log")])  # still open in its writer
        for i in range(200):  # atomic saves: each deletes the file it replaces
            j.commit([Change(op="create", file_id=100 + i, path=b"doc.tmp", mode=0o100644)])
            j.commit([Change(op="rename", file_id=100 + i, path=b"doc.tmp", path2=b"doc")])
        assert checkpoints.write_due(j._storage, j.reader, every_records=16) > 10
        late = j.commit([write(7, b"app.log", 1)])[0]  # the writer closes it: a version of a deleted file
        for i in range(40):
            j.commit([Change(op="setattr", file_id=300, path=b"doc", mode=0o100600 + i)])
        checkpoints.write_due(j._storage, j.reader, every_records=16)
        with j.reader() as r:
            head = r.head_seq()
            last = checkpoints.nearest(r, head)
            st, _, _, _ = checkpoints.load(r, last)
            assert len(st.files) <= 40, f"{len(st.files)} file states loaded"
            assert 150 <= len(st.gone) and 7 in st.gone
            assert r.record(late).file_id == 7
            for seq in [1, 2, 3, 4, 100, late - 1, late, late + 1, head]:
                assert r.tree_at(seq) == full_replay(r, seq), seq


def test_writing_a_checkpoint_leaves_content_edits_undecoded(tmp_path, monkeypatch):
    """The tree state needs no chunk list: building a checkpoint decodes records
    with ``lists=False`` (issue 19, eleventh session: a 4 GiB file's edit decoded
    to ~27 MiB of Python objects at the maintenance tick after its capture)."""
    calls = []
    real = checkpoints.decode_record

    def spy(v, seq, **kw):
        calls.append(kw.get("lists", True))
        return real(v, seq, **kw)
    monkeypatch.setattr(checkpoints, "decode_record", spy)
    versions: dict = {}
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        for n in range(40):
            p = b"f%d" % (n % 5)
            if p not in versions:
                j.commit(_change("create", p, b"", n, versions))
            versions[p] = j.commit(_change("write", p, b"", n, versions))[-1]
        assert checkpoints.write_due(j._storage, j.reader, every_records=16) >= 2
        assert calls and not any(calls)
        with j.reader() as r:
            head = r.head_seq()
            monkeypatch.setattr(checkpoints, "decode_record", real)
            assert r.tree_at(head) == full_replay(r, head)
