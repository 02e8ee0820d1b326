"""Issue 20: delta bases for files replaced by delete-and-create.

ops.Operations, capture.Recorder and a real Journal without FUSE (the
Driver of test_history_identity).  A 256 KiB text file with one line
changed costs a few hundred bytes when it is rewritten in place; replaced
by unlink + create, or renamed away and created again, it must cost about
the same: the replaced file's last version is the delta base hint of the
new file's first capture (a hint only: the identities stay apart).
"""

from __future__ import annotations

import random

from tests.ops.inprocess import session
from tests.ops.test_history_identity import Driver


def _text(seed: int = 20) -> bytes:
    rnd = random.Random(seed)
    lines, size = [], 0
    while size < 256 << 10:
        line = b"%06d %s\n" % (len(lines), rnd.randbytes(rnd.randint(10, 40)).hex().encode())
        lines.append(line)
        size += len(line)
    return b"".join(lines)


async def _stored_by(tmp_path, replace) -> tuple[int, tuple]:
    """Stored bytes the second version of f costs when ``replace(d, data)`` writes it."""
    src = tmp_path / "src"
    src.mkdir()
    v1 = _text()
    lines = v1.split(b"\n")
    lines[len(lines) // 2] = b"one changed line"
    v2 = b"\n".join(lines)
    async with session(src) as (j, rec, ops):
        d = Driver(ops)
        await d.save(b"f", v1)
        await rec.drain()
        with j.reader() as r:
            before = r.stats()["stored_bytes"]
            fid1 = r.file_id_at(b"f")
        await replace(d, v2)
        await rec.drain()
        with j.reader() as r:
            after = r.stats()["stored_bytes"]
            fid2 = r.file_id_at(b"f")
            assert r.read_content(r.file_state(fid2).content_seq) == v2
    return after - before, (fid1, fid2)


async def test_rewrite_in_place_is_the_reference(tmp_path):
    async def rewrite(d, data):
        await d.save(b"f", data)  # O_TRUNC + write: the same file
    cost, (fid1, fid2) = await _stored_by(tmp_path, rewrite)
    assert fid1 == fid2
    assert cost < 1024, cost


async def test_unlink_and_create_deltas_against_the_gone_file(tmp_path):
    async def replace(d, data):
        await d.unlink(b"f")
        await d.save(b"f", data)
    cost, _ = await _stored_by(tmp_path, replace)
    print("unlink+create stored", cost)
    assert cost < 1024, cost


async def test_renamed_away_and_created_again_deltas_against_it(tmp_path):
    async def replace(d, data):
        await d.rename(b"f", b"f.orig")
        await d.save(b"f", data)
    cost, (fid1, fid2) = await _stored_by(tmp_path, replace)
    print("rename-away+create stored", cost)
    assert cost < 1024, cost
    assert fid1 != fid2  # a base hint, not an identity: f.orig keeps the old file's history
