"""The differential history test on the no-kernel tier (issue 18).

ops.Operations, capture.Recorder and a real Journal, wired as mount.py
wires them but without FUSE: the test calls the handlers the kernel would
call.  Seeded random sequences of creates, writes, appends, truncates,
atomic saves through ignored and plain temp names, renames (to free names
and over files), unlinks, re-creations, hard links, symlinks, mkdir/rmdir,
chmod, xattrs, vim's backup-rename save and log rotation run on names from
a small alphabet, so they collide.  At moments (the recorder drained) SRC
is copied; at the end the journal's tree right after each moment
(``Reader.tree_at``) must equal the copy (paths, types, content, modes,
symlink targets, user xattrs, hard-link groups), and so must the live
index now.  tests/mount/test_history_differential.py is the same through a
real mount and the CLI.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import stat
from types import SimpleNamespace

import pytest
import trio
from pyfuse3 import FUSEError

from deltafs.capture import Recorder
from deltafs.ignore import Ignore
from deltafs.journal import Journal
from deltafs.ops import ROOT, Operations

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022, pid=os.getpid())
NAMES = [b"a", b"b", b"c", b"a.1", b"a.2"]
TEMPS = [b"a.swp", b"x.tmp", b"a.new"]
DIRS = [b"d", b"e"]


_IGNORES: dict[str, Ignore] = {}


def snapshot(root: str) -> dict:
    """SRC as the journal should see it (ignored names, such as a temp file
    left by a failed save, are not journaled)."""
    ignore = _IGNORES.get(root) or _IGNORES.setdefault(root, Ignore(root))
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d != ".deltafs"]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root).encode()
            s = os.lstat(p)
            if ignore.match(rel, stat.S_ISDIR(s.st_mode)):
                continue
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("l", os.readlink(p).encode(), None, None)
                continue
            xa = {k.encode(): os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p)
                  if k.startswith("user.")}
            if stat.S_ISDIR(s.st_mode):
                out[rel] = ("d", None, stat.S_IMODE(s.st_mode), xa)
            else:
                out[rel] = ("f", open(p, "rb").read(), stat.S_IMODE(s.st_mode), xa)
                inodes.setdefault(s.st_ino, []).append(rel)
    return {"entries": out, "links": sorted(sorted(g) for g in inodes.values() if len(g) > 1)}


def journal_tree(r, seq=None) -> dict:
    tree = r.tree_at(seq)
    out, groups = {}, {}
    for p, e in tree.items():
        if e.kind == "l":
            out[p] = ("l", e.target, None, None)
        elif e.kind == "d":
            out[p] = ("d", None, stat.S_IMODE(e.mode or 0), dict(e.xattrs))
        else:
            data = r.read_content(e.content_seq) if e.content_seq else b""
            out[p] = ("f", data, stat.S_IMODE(e.mode or 0), dict(e.xattrs))
            if e.link_group is not None:
                groups.setdefault(e.link_group, []).append(p)
    return {"entries": out, "links": sorted(sorted(g) for g in groups.values() if len(g) > 1)}


class Driver:
    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    async def ino(self, path: bytes) -> int:
        ino = ROOT
        for part in path.split(b"/"):
            ino = (await self.ops.lookup(ino, part, CTX)).st_ino
            if ino == 0:  # the negative entry the kernel would cache
                raise FUSEError(errno.ENOENT)
        return ino

    async def parent(self, path: bytes) -> tuple[int, bytes]:
        head, _, name = path.rpartition(b"/")
        return (await self.ino(head) if head else ROOT), name

    async def save(self, path: bytes, data: bytes, append: bool = False) -> None:
        try:
            ino = await self.ino(path)
            fi = await self.ops.open(ino, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC), CTX)
            if not append:
                await self.ops.setattr(ino, SimpleNamespace(st_size=0), SimpleNamespace(
                    update_size=True, update_mode=False, update_uid=False, update_gid=False,
                    update_atime=False, update_mtime=False, update_ctime=False), fi.fh, CTX)
        except FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            p, name = await self.parent(path)
            fi, _ = await self.ops.create(p, name, 0o644, os.O_WRONLY, CTX)
        off = os.fstat(self.ops.handles[fi.fh].fd).st_size if append else 0
        await self.ops.write(fi.fh, off, data)
        await self.ops.release(fi.fh)

    async def rename(self, old: bytes, new: bytes) -> None:
        po, no = await self.parent(old)
        pn, nn = await self.parent(new)
        await self.ops.rename(po, no, pn, nn, 0, CTX)

    async def unlink(self, path: bytes) -> None:
        p, name = await self.parent(path)
        await self.ops.unlink(p, name, CTX)


async def run_sequence(tmp_path, seed: int, steps: int = 150) -> None:
    src = tmp_path / "src"
    src.mkdir()
    jdir = src / ".deltafs"
    rnd = random.Random(seed)
    with Journal.open(str(jdir), create=True) as j:
        rec = Recorder(j, str(src))
        jst = os.stat(jdir)
        ops = Operations(str(src), hidden=(jst.st_dev, jst.st_ino), recorder=rec, fd_limit=1024)
        d = Driver(ops)
        moments = []
        errors: list = []
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.run)
            await rec.scan(ops, jst.st_ino)
            for i in range(steps):
                name = rnd.choice(NAMES)
                where = rnd.choice([b"", b"d/"])
                path = where + name
                data = rnd.choice([b"", b"x", rnd.randbytes(rnd.randrange(1, 300)), b"y" * 5000])
                op = rnd.choice(["write", "write", "append", "truncate", "save", "save", "vim", "rotate",
                                 "rename", "unlink", "unlink", "link", "symlink", "mkdir", "rmdir",
                                 "chmod", "xattr", "moment"])
                other = None
                try:
                    if op == "write":
                        await d.save(path, data)
                    elif op == "append":
                        await d.save(path, data, append=True)
                    elif op == "truncate":
                        ino = await d.ino(path)
                        await ops.setattr(ino, SimpleNamespace(st_size=rnd.randrange(0, 400)), SimpleNamespace(
                            update_size=True, update_mode=False, update_uid=False, update_gid=False,
                            update_atime=False, update_mtime=False, update_ctime=False), None, CTX)
                    elif op == "save":
                        tmp = where + rnd.choice(TEMPS)
                        await d.save(tmp, data)
                        await d.rename(tmp, path)
                    elif op == "vim":
                        await d.rename(path, path + b"~")
                        await d.save(path, data)
                        await d.unlink(path + b"~")
                    elif op == "rotate":
                        await d.rename(path, path + b".1")
                        await d.save(path, data)
                    elif op == "rename":
                        other = rnd.choice([b"", b"d/"]) + rnd.choice(NAMES + DIRS)
                        await d.rename(path, other)
                    elif op == "unlink":
                        await d.unlink(path)
                    elif op == "link":
                        other = new = rnd.choice([b"", b"d/"]) + rnd.choice(NAMES)
                        p, nn = await d.parent(new)
                        await ops.link(await d.ino(path), p, nn, CTX)
                    elif op == "symlink":
                        p, nn = await d.parent(path)
                        await ops.symlink(p, nn, rnd.choice([b"a", b"../b", b"nowhere"]), CTX)
                    elif op == "mkdir":
                        await ops.mkdir(ROOT, rnd.choice(DIRS), 0o755, CTX)
                    elif op == "rmdir":
                        await ops.rmdir(ROOT, rnd.choice(DIRS), CTX)
                    elif op == "chmod":
                        ino = await d.ino(path)
                        if not stat.S_ISLNK((await ops.getattr(ino)).st_mode):
                            await ops.setattr(ino, SimpleNamespace(st_mode=rnd.choice([0o600, 0o644, 0o755])),
                                              SimpleNamespace(update_size=False, update_mode=True,
                                                              update_uid=False, update_gid=False,
                                                              update_atime=False, update_mtime=False,
                                                              update_ctime=False), None, CTX)
                    elif op == "xattr":
                        ino = await d.ino(path)
                        if not stat.S_ISLNK((await ops.getattr(ino)).st_mode):
                            await ops.setxattr(ino, b"user.k", data[:8], CTX)
                except FUSEError as e:
                    errors.append((op, path, e.errno))  # missing name, a directory, not empty...: nothing happened
                if os.environ.get("HIST_DEBUG"):
                    print(i, op, path, other if op in ("rename", "link") else data[:8])
                if op == "moment" or i == steps - 1 or os.environ.get("HIST_EVERY"):
                    await rec.drain()
                    with j.reader() as r:
                        moments.append((r.head_seq(), snapshot(str(src)), op, i))
            nursery.cancel_scope.cancel()
        if os.environ.get("HIST_DEBUG"):
            print(collections.Counter((e[0], e[2]) for e in errors))
        with j.reader() as r:
            for seq, then, _, i in moments:
                got = journal_tree(r, seq)
                diff = {k: (then["entries"].get(k), got["entries"].get(k))
                        for k in set(then["entries"]) | set(got["entries"])
                        if then["entries"].get(k) != got["entries"].get(k)}
                assert not diff and then["links"] == got["links"], \
                    f"seed {seed}, step {i}: journal tree at {seq} differs (SRC, journal): {diff} " \
                    f"links {then['links']} vs {got['links']}"
            live = {p: fid for p, fid, _ in r.current_tree() if p}
            assert set(live) == set(moments[-1][1]["entries"]), f"seed {seed}: live index differs"
            for p, fid in live.items():
                if moments[-1][1]["entries"][p][0] == "f":
                    assert p in r.file_state(fid).links, f"seed {seed}: {p} has another file's identity"
        for h in list(ops.handles):
            os.close(h)
        for node in ops.nodes.values():  # the next sequence starts with as many descriptors free
            if node.cached_fd >= 0 and node.ino != ROOT:
                os.close(node.cached_fd)
                node.cached_fd = -1


@pytest.mark.parametrize("seed", range(int(os.environ.get("DELTAFS_HISTORY_SEEDS", "24"))))
async def test_journal_tree_follows_src(tmp_path, seed):
    await run_sequence(tmp_path, seed)
