"""The editor-save and file-identity rules without FUSE (docs/design.md, "File identity").

ops.Operations, the capture package's Recorder and a real Journal, wired as
mount.py wires them; the test calls the handlers the kernel would call
(tests/ops/test_history_identity.py's Driver).  Each pattern of the design
table runs on a fresh SRC and asserts which identity (file id) each path
ends with, whether a history continued, and the cause of the version a
rename made.  The rename rules themselves (capture/saves.py) are also
checked directly, case by case.
"""

from __future__ import annotations

import os
import stat
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest

from deltafs.capture import Recorder, saves
from deltafs.journal import Journal
from deltafs.ops import ROOT, Operations

from tests.ops.inprocess import session
from tests.ops.test_history_identity import CTX, Driver


class Src:
    """A mounted-in-spirit SRC: ``d`` drives the handlers, ``fid``/``history``
    read the journal once everything queued is committed."""

    def __init__(self, j: Journal, rec: Recorder, ops: Operations) -> None:
        self.j, self.rec, self.ops = j, rec, ops
        self.d = Driver(ops)

    async def fid(self, path: bytes) -> int | None:
        await self.rec.drain()
        with self.j.reader() as r:
            return r.file_id_at(path)

    async def contents(self, path: bytes) -> list[bytes]:
        """The content of every version of the file now at ``path``, oldest first."""
        fid = await self.fid(path)
        with self.j.reader() as r:
            return [r.read_content(s) for s in sorted(r.versions_of(fid)) if r.record(s).is_content]

    async def causes(self, path: bytes) -> list[str]:
        fid = await self.fid(path)
        with self.j.reader() as r:
            return [r.record(s).cause for s in sorted(r.versions_of(fid)) if r.record(s).is_content]

    async def link(self, old: bytes, new: bytes) -> None:
        await self.ops.link(await self.d.ino(old), ROOT, new, CTX)


@asynccontextmanager
async def mounted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    async with session(src) as (j, rec, ops):
        yield Src(j, rec, ops)


async def test_vim_backup_rename_save_continues_the_history(tmp_path):
    """`mv f f~; write f; rm f~`: f~ is ignored, so the old file is gone and f continues it."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.rename(b"f", b"f~")
        await s.d.save(b"f", b"two\n")
        await s.d.unlink(b"f~")
        assert await s.fid(b"f") == before
        assert await s.contents(b"f") == [b"one\n", b"two\n"]


async def test_atomic_rename_over_is_the_next_version(tmp_path):
    """`write f.tmp; mv f.tmp f` (f's only name): the next version of f, cause rename-over."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.save(b"f.tmp", b"two\n")
        await s.d.rename(b"f.tmp", b"f")
        assert await s.fid(b"f") == before
        assert await s.contents(b"f") == [b"one\n", b"two\n"]
        assert (await s.causes(b"f"))[-1] == "rename-over"


async def test_ignored_temp_renamed_over_is_the_next_version(tmp_path):
    """`write f.swp; mv f.swp f`: the swap file is never journaled; f gets its content."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.save(b"f.swp", b"two\n")
        assert await s.fid(b"f.swp") is None
        await s.d.rename(b"f.swp", b"f")
        assert await s.fid(b"f") == before
        assert await s.contents(b"f") == [b"one\n", b"two\n"]


async def test_delete_then_create_within_the_window_continues(tmp_path):
    """`rm f; echo new > f` within 120 s: f continues its history."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.unlink(b"f")
        await s.d.save(b"f", b"two\n")
        assert await s.fid(b"f") == before
        assert await s.contents(b"f") == [b"one\n", b"two\n"]


async def test_delete_then_rename_onto_the_gone_path_is_a_save(tmp_path):
    """`rm f; mv g f` within 120 s (g a plain file): the next version of f, cause rename-over."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.save(b"g", b"two\n")
        await s.d.unlink(b"f")
        await s.d.rename(b"g", b"f")
        assert await s.fid(b"f") == before
        assert (await s.causes(b"f"))[-1] == "rename-over"
        assert await s.contents(b"f") == [b"one\n", b"two\n"]


async def test_log_rotation_gives_the_new_log_a_new_identity(tmp_path):
    """`mv app.log app.log.1; echo > app.log`: app.log.1 keeps the history, app.log is new."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"app.log", b"old lines\n")
        before = await s.fid(b"app.log")
        await s.d.rename(b"app.log", b"app.log.1")
        await s.d.save(b"app.log", b"new lines\n")
        assert await s.fid(b"app.log.1") == before
        assert await s.fid(b"app.log") not in (None, before)
        assert await s.contents(b"app.log") == [b"new lines\n"]


async def test_backup_rename_to_a_visible_name_is_a_new_file(tmp_path):
    """`mv f f.bak; write f` (.bak not ignored): f.bak keeps f's history; f is new."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        before = await s.fid(b"f")
        await s.d.rename(b"f", b"f.bak")
        await s.d.save(b"f", b"two\n")
        assert await s.fid(b"f.bak") == before
        assert await s.fid(b"f") not in (None, before)


async def test_hard_link_removed_then_recreated_is_a_new_file(tmp_path):
    """`ln x y; rm x; echo new > x`: y keeps the file and its history; x is new."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"x", b"one\n")
        before = await s.fid(b"x")
        await s.link(b"x", b"y")
        await s.d.unlink(b"x")
        await s.d.save(b"x", b"new\n")
        assert await s.fid(b"y") == before
        assert await s.fid(b"x") not in (None, before)
        assert await s.contents(b"y") == [b"one\n"]


async def test_rename_over_a_hard_linked_file_leaves_the_other_link_its_identity(tmp_path):
    """`write g; mv g f` (f has another link h): h keeps the old file; f is g's."""
    async with mounted(tmp_path) as s:
        await s.d.save(b"f", b"one\n")
        old = await s.fid(b"f")
        await s.link(b"f", b"h")
        await s.d.save(b"g", b"two\n")
        g = await s.fid(b"g")
        await s.d.rename(b"g", b"f")
        assert await s.fid(b"h") == old
        assert await s.fid(b"f") == g


# --- the rename rules, case by case (capture/saves.py) ------------------------------------------
REG = stat.S_IFREG | 0o644


def st(mode=REG, nlink=1):
    return os.stat_result((mode, 1, 1, nlink, 0, 0, 0, 0, 0, 0))


def never_gone():
    raise AssertionError("was_gone() asked when it does not matter")


@pytest.mark.parametrize("case, args, kind", [
    ("both names ignored", (st(), True, True, 0, False, None), saves.IGNORED),
    ("RENAME_EXCHANGE", (st(), False, False, 2, True, st()), saves.EXCHANGE),
    ("to an ignored name (vim's f -> f~)", (st(), False, True, 0, False, None), saves.HIDDEN),
    ("over the target's only name", (st(), False, False, 0, True, st()), saves.SAVE),
    ("from an ignored temp onto a free path", (st(), True, False, 0, False, None), saves.SAVE),
    ("a directory from an ignored name", (st(stat.S_IFDIR | 0o755, 2), True, False, 0, False, None),
     saves.APPEARS),
    ("over a hard-linked file", (st(), False, False, 0, True, st(nlink=2)), saves.RENAME),
    ("a hard-linked file over another", (st(nlink=2), False, False, 0, True, st()), saves.RENAME),
    ("a directory over a directory", (st(stat.S_IFDIR | 0o755, 2), False, False, 0, True,
                                      st(stat.S_IFDIR | 0o755, 2)), saves.RENAME),
])
def test_classify_rename(case, args, kind):
    assert saves.classify_rename(*args, was_gone=never_gone).kind == kind, case


def test_a_rename_onto_a_free_path_asks_whether_it_was_just_gone():
    asked = []
    for gone, kind in ((True, saves.SAVE), (False, saves.RENAME)):
        what = saves.classify_rename(st(), False, False, 0, False, None,
                                     lambda g=gone: asked.append(g) or g)
        assert what.kind == kind
    assert asked == [True, False]


def test_a_save_over_a_linked_file_unlinks_the_path_first():
    what = saves.classify_rename(st(), True, False, 0, True, st(nlink=2), never_gone)
    assert (what.kind, what.over_is_save_target, what.replaced_lives_on) == (saves.SAVE, False, True)
    what = saves.classify_rename(st(), True, False, 0, True, st(), never_gone)
    assert (what.kind, what.over_is_save_target, what.replaced_lives_on) == (saves.SAVE, True, False)


def test_ops_only_passes_what_the_rules_need():
    """SimpleNamespace is enough for the stat of what a rename replaced."""
    what = saves.classify_rename(st(), False, False, 0, True, SimpleNamespace(st_mode=REG, st_nlink=1),
                                 never_gone)
    assert what.kind == saves.SAVE


# --- a journaled restore's identities (capture/identity.py, used by history/restore.py) -----------
def test_a_restored_file_takes_back_its_identity_unless_it_lives_on():
    from deltafs.capture.identity import restored_file_id

    used: set[int] = set()
    assert restored_file_id(42, False, used) == 42  # deleted since: its history continues
    again = restored_file_id(42, False, used)  # a second path of this restore: never the same file
    assert again not in (0, 42)
    alive = restored_file_id(7, True, used)  # still alive under another name
    assert alive not in (0, 7)
    fresh = restored_file_id(None, False, used)  # content the journal never saw
    assert fresh and fresh < 2**63
    assert used == {42, again, alive, fresh}
