"""The journal writer edits a file's packed chunk list in place into its next
version's (issue 19, ``schema.apply_edit_packed_in_place``).  A version that
is rejected after its list was edited must leave no trace: the next version
built on the same base gets the base's true list, and every version reads
back as the bytes that were captured."""

from __future__ import annotations

import os

from deltafs.capture.content import FULL, ContentCapture
from deltafs.journal import Journal


def test_a_rejected_version_leaves_the_base_list_intact(tmp_path):
    path = tmp_path / "f"
    data = bytearray(os.urandom(1 << 20))
    path.write_bytes(data)
    with Journal.open(str(tmp_path / "j"), create=True) as j:
        cc = ContentCapture(j)
        fd = os.open(path, os.O_RDWR)
        try:
            ch, _ = cc.compute(fd, b"f", "write", FULL, None)
            base = j.commit([ch])[-1]
            # an edit whose size does not match its list: rejected after the
            # writer took the base's list and edited it
            os.pwrite(fd, b"X", 1000)
            data[1000:1001] = b"X"
            bad, _ = cc.compute(fd, b"f", "fsync", [(1000, 1001)], base)
            bad.size += 1
            (res,) = j.commit_many([[bad]])
            assert isinstance(res, Exception)
            # the same edit, right this time, on the same base
            good, _ = cc.compute(fd, b"f", "fsync", [(1000, 1001)], base)
            seq = j.commit([good])[-1]
            os.pwrite(fd, b"Y", 700_000)
            data[700_000:700_001] = b"Y"
            nxt, _ = cc.compute(fd, b"f", "fsync", [(700_000, 700_001)], seq)
            seq2 = j.commit([nxt])[-1]
        finally:
            os.close(fd)
        with j.reader() as r:
            assert r.read_content(seq2) == bytes(data)
            assert r.read_content(base)[1000:1001] != b"X"
        assert j.verify(full=True).ok
