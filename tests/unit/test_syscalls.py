"""deltafs._syscalls: the file at any depth (at_path), fallocate with modes."""

from __future__ import annotations

import os

from deltafs import _syscalls as sc


def test_at_path_reaches_beyond_path_max(tmp_path):
    names = [b"%02d" % i + b"x" * 250 for i in range(20)]
    d = os.open(tmp_path, os.O_PATH)
    for name in names:
        os.mkdir(name, dir_fd=d)
        nd = os.open(name, os.O_PATH, dir_fd=d)
        os.close(d)
        d = nd
    fd = os.open(b"f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=d)
    os.write(fd, b"deep")
    os.close(fd)
    os.close(d)
    root = os.fsencode(tmp_path)
    rel = b"/".join(names + [b"f"])
    assert len(root) + len(rel) > 4096
    assert sc.at_path(root, rel, os.stat).st_size == 4
    fd = sc.at_path(root, rel, os.open, os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"deep"
    finally:
        os.close(fd)
    assert sc.at_path(root, b"", os.stat).st_ino == os.stat(tmp_path).st_ino
    assert sc.at_path(root, names[0], os.stat).st_ino == os.stat(os.path.join(root, names[0])).st_ino


def test_fallocate_modes(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    fd = os.open(p, os.O_RDWR)
    try:
        sc.fallocate(fd, sc.FALLOC_FL_PUNCH_HOLE | sc.FALLOC_FL_KEEP_SIZE, 4096, 4096)
        assert os.pread(fd, 4096, 4096) == bytes(4096) and os.fstat(fd).st_size == 10000
        sc.fallocate(fd, 0, 0, 20000)
        assert os.fstat(fd).st_size == 20000
    finally:
        os.close(fd)
