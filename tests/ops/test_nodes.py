"""ops.Operations called directly (no kernel): the node tree and its bounded descriptors.

With a descriptor budget of 4 every request closes and reopens descriptors,
so these check that names stay right through renames, hard links and
unlinks, that an unlinked-but-open file and the root keep working, that
the daemon's descriptors stay bounded whatever the number of inodes, and
that paths come from the tree at any depth (beyond PATH_MAX too).
"""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pytest
from pyfuse3 import FUSEError

from deltafs import fdcache
from deltafs.ops import ROOT, Operations

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), umask=0o022, pid=os.getpid())


@pytest.fixture
def ops(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    o = Operations(str(src), fd_limit=1024, fd_budget=4)
    yield o
    for h in list(o.handles):
        os.close(h)


async def create(ops, parent: int, name: bytes, data: bytes = b"") -> int:
    fi, e = await ops.create(parent, name, 0o644, os.O_WRONLY, CTX)
    os.pwrite(fi.fh, data, 0)
    await ops.release(fi.fh)
    return e.st_ino


def open_descriptors() -> int:
    return fdcache.count_open()


async def test_descriptors_stay_bounded_with_many_inodes(ops):
    base = open_descriptors()
    d = (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    inos = [await create(ops, d, b"f%d" % i, b"%d" % i) for i in range(200)]
    for i, ino in enumerate(inos):  # every inode still answers, through its name
        st = await ops.getattr(ino)
        assert st.st_size == len(b"%d" % i)
        fi = await ops.open(ino, os.O_RDONLY, CTX)
        assert await ops.read(fi.fh, 0, 10) == b"%d" % i
        await ops.release(fi.fh)
        assert await ops.listxattr(ino, CTX) == []  # needs the node's own descriptor
    assert len(ops.nodes) == 202
    assert len(ops.fc.lru) <= 4 and ops.fc.pinned == 1  # only the root is pinned
    assert open_descriptors() - base <= 4 + 1
    assert ops.fc.evictions > 0


async def test_names_follow_renames_links_and_unlinks(ops):
    a = (await ops.mkdir(ROOT, b"a", 0o755, CTX)).st_ino
    b = (await ops.mkdir(a, b"b", 0o755, CTX)).st_ino
    f = await create(ops, b, b"f", b"hello")
    assert ops.path_of(ops.nodes[f]) == b"a/b/f"
    await ops.rename(ROOT, b"a", ROOT, b"z", 0, CTX)  # an ancestor moves
    assert ops.path_of(ops.nodes[f]) == b"z/b/f"
    await ops.link(f, ROOT, b"hard", CTX)
    await ops.unlink(b, b"f", CTX)  # its first name goes: the link remains
    assert ops.path_of(ops.nodes[f]) == b"hard"
    ops.fc.shed("test")  # nothing cached: reopened through the remaining name
    for n in list(ops.fc.lru):
        ops.fc.drop(n)
    assert (await ops.getattr(f)).st_nlink == 1
    fi = await ops.open(f, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b"hello"
    await ops.release(fi.fh)
    # RENAME_EXCHANGE swaps the names of two nodes
    g = await create(ops, ROOT, b"g", b"gg")
    await ops.rename(ROOT, b"g", ROOT, b"hard", 2, CTX)
    assert ops.path_of(ops.nodes[g]) == b"hard" and ops.path_of(ops.nodes[f]) == b"g"
    # a rename over a file: the replaced node has no name left
    await ops.rename(ROOT, b"g", ROOT, b"hard", 0, CTX)
    assert ops.path_of(ops.nodes[f]) == b"hard" and ops.path_of(ops.nodes[g]) is None


async def test_unlinked_open_file_and_removed_directory_keep_working(ops):
    f = await create(ops, ROOT, b"f", b"data")
    for n in list(ops.fc.lru):  # the node holds no descriptor now
        ops.fc.drop(n)
    fi = await ops.open(f, os.O_RDWR, CTX)
    await ops.unlink(ROOT, b"f", CTX)
    node = ops.nodes[f]
    assert node.parent is None and node.pinned and node.cached_fd >= 0  # taken before the name went
    for i in range(20):  # churn the cache
        await create(ops, ROOT, b"x%d" % i)
    st = await ops.getattr(f)
    assert st.st_nlink == 0 and st.st_size == 4
    os.pwrite(fi.fh, b"more", 4)
    assert (await ops.getattr(f)).st_size == 8
    await ops.release(fi.fh)
    await ops.forget([(f, node.lookups)])
    assert f not in ops.nodes and ops.fc.pinned == 1
    d = (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    for n in list(ops.fc.lru):
        ops.fc.drop(n)
    await ops.rmdir(ROOT, b"d", CTX)
    assert stat.S_ISDIR((await ops.getattr(d)).st_mode)  # a process may still be in it
    assert (await ops.getattr(ROOT)).st_ino == ROOT


async def test_forgotten_directory_stays_while_a_child_is_known(ops):
    d = (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    f = await create(ops, d, b"f", b"x")
    await ops.forget([(d, ops.nodes[d].lookups)])
    assert d in ops.nodes  # its child's path goes through it
    assert ops.path_of(ops.nodes[f]) == b"d/f"
    await ops.forget([(f, ops.nodes[f].lookups)])
    assert d not in ops.nodes and f not in ops.nodes


async def test_paths_beyond_path_max(ops):
    ino, rel = ROOT, []
    for i in range(20):
        name = b"%03d" % i + b"n" * 250
        ino = (await ops.mkdir(ino, name, 0o755, CTX)).st_ino
        rel.append(name)
    f = await create(ops, ino, b"deep", b"bottom")
    assert len(ops.src_b) + len(b"/".join(rel)) > 4096
    for n in list(ops.fc.lru):
        ops.fc.drop(n)
    assert ops.path_of(ops.nodes[f]) == b"/".join(rel + [b"deep"])
    assert (await ops.getattr(f)).st_size == 6  # reopened through 20 ancestors
    fi = await ops.open(f, os.O_RDWR, CTX)
    os.pwrite(fi.fh, b"B", 0)
    await ops.release(fi.fh)
    attr = SimpleNamespace(st_size=3, st_mode=0o600)
    fields = SimpleNamespace(update_size=True, update_mode=True, update_uid=False, update_gid=False,
                             update_atime=False, update_mtime=False, update_ctime=False)
    st = await ops.setattr(f, attr, fields, None, CTX)  # truncate(2) and chmod(2) by inode
    assert st.st_size == 3 and stat.S_IMODE(st.st_mode) == 0o600
    fi = await ops.open(f, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b"Bot"
    await ops.release(fi.fh)


async def test_replaced_behind_the_mount_is_stale_not_wrong(ops, tmp_path):
    f = await create(ops, ROOT, b"f", b"one")
    for n in list(ops.fc.lru):
        ops.fc.drop(n)
    # replaced behind the mount's back (not allowed, but it must not answer with another file)
    (tmp_path / "src" / "f.new").write_bytes(b"another file")
    os.rename(tmp_path / "src" / "f.new", tmp_path / "src" / "f")
    with pytest.raises(FUSEError) as e:
        await ops.open(f, os.O_RDONLY, CTX)
    assert e.value.errno == errno.ESTALE


async def test_shortage_sheds_cache_and_refuses_user_opens_beyond_the_reserve(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = open_descriptors()
    limit = base + 64  # a tiny limit: the reserve is a quarter of it
    o = Operations(str(src), fd_limit=limit, fd_budget=100)
    assert o.fc.reserve == limit // 4
    inos = [await create(o, ROOT, b"f%d" % i) for i in range(40)]
    handles, refused = [], 0
    for ino in inos:
        try:
            handles.append((await o.open(ino, os.O_RDONLY, CTX)).fh)
        except FUSEError as e:
            assert e.errno == errno.EMFILE
            refused += 1
    assert refused > 0 and o.fc.refused == refused and o.fc.shortages == 1
    assert open_descriptors() < limit - o.fc.reserve + 2  # the reserve stayed free
    for fh in handles:
        await o.release(fh)
    fi = await o.open(inos[0], os.O_RDONLY, CTX)  # room again
    await o.release(fi.fh)


async def test_an_fsync_error_is_its_errno_not_eio(tmp_path):
    """fsync flushes SRC and records the version in a nursery; an error there reached the
    wrapper as an ExceptionGroup and became EIO.  The recorder below fails on purpose: a
    journal-side OSError during an fsync capture cannot be caused on demand (the tests of a
    full journal disk cover the real one)."""
    from deltafs.ops import NullRecorder

    class FailingRecorder(NullRecorder):
        enabled = True

        def settled(self, node):
            return False  # a capture is queued: fsync must wait for the journal

        async def fsync(self, ops, node, flush=None):
            raise OSError(errno.ENOSPC, "no space left for the journal")

        async def before_change(self, *a, **kw):
            pass

    src = tmp_path / "src"
    src.mkdir()
    o = Operations(str(src), fd_limit=1024, recorder=FailingRecorder())
    fi, _ = await o.create(ROOT, b"f", 0o644, os.O_WRONLY, CTX)
    await o.write(fi.fh, 0, b"data")
    with pytest.raises(FUSEError) as e:
        await o.fsync(fi.fh, False)
    assert e.value.errno == errno.ENOSPC
    await o.release(fi.fh)
