"""Issue 20: an in-place (aligned) capture takes, for each changed block, the
old block at the same offset as its delta base, also when the file grows.

A database updates pages in place and appends new ones.  Pairing changed
blocks with old ones by relative position drifts as soon as the file
grows; each save then stores whole blocks.  Here an 8 MiB file gets 100
scattered 16-byte edits per save, once without growth and once with a
200 KiB append per save: the growing file must store per save about what
the edits cost without growth plus what the append costs compressed.
"""

from __future__ import annotations

import os
import random

from deltafs import chunking as C
from tests.unit.test_capture_cache import Daemon

SIZE = 8 << 20
EDITS = 100
APPEND = 200 << 10
SAVES = 4


def _text(rnd: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = b"%08d|%s|\n" % (size, rnd.randbytes(rnd.randint(20, 60)).hex().encode())
        out.append(line)
        size += len(line)
    return b"".join(out)[:n]


def _history(tmp_path, grow: bool) -> list[int]:
    """Stored bytes per save (after the first)."""
    tmp_path.mkdir()
    d = Daemon(tmp_path)
    rnd = random.Random(20)
    path = d.src / "db"
    path.write_bytes(_text(rnd, SIZE))
    seq = d.capture(b"db")
    costs = []
    for _ in range(SAVES):
        old_size = path.stat().st_size
        dirty = []
        with open(path, "r+b") as f:
            for _ in range(EDITS):
                off = rnd.randrange(0, old_size - 16)
                f.seek(off)
                f.write(rnd.randbytes(8).hex().encode())
                dirty.append((off, off + 16))
            if grow:
                f.seek(old_size)
                f.write(_text(rnd, APPEND))
                dirty.append((old_size, old_size + APPEND))
        with d.j.reader() as r:
            before = r.stats()["stored_bytes"]
        seq = d.capture(b"db", dirty, seq)
        with d.j.reader() as r:
            costs.append(r.stats()["stored_bytes"] - before)
    assert d.content(seq) == path.read_bytes()
    d.j.close()
    return costs


def test_growing_file_with_in_place_edits_deltas_at_the_same_offset(tmp_path):
    flat = _history(tmp_path / "flat", grow=False)
    grown = _history(tmp_path / "grown", grow=True)
    append = len(C.compress_chunk(_text(random.Random(1), APPEND)))
    print("per save: edits only", flat, "edits + append", grown, "append alone", append)
    for f, g in zip(flat, grown):
        assert g <= f * 1.5 + append * 1.3 + 4096, (flat, grown, append)


def test_raw_bytes_counts_chunks_streamed_ahead_of_their_record(tmp_path):
    """A capture over CHUNK_FLUSH_BYTES stores most chunks before its record
    (Journal.put_chunks): raw_bytes must count them as stored_bytes does."""
    from deltafs.capture import CHUNK_FLUSH_BYTES

    tmp_path.mkdir(exist_ok=True)
    d = Daemon(tmp_path)
    size = CHUNK_FLUSH_BYTES * 3
    (d.src / "big").write_bytes(_text(random.Random(3), size))
    d.capture(b"big")
    with d.j.reader() as r:
        st = r.stats()
    d.j.close()
    assert st["raw_bytes"] == size, st  # no chunk repeats in this text
    assert st["stored_bytes"] < st["raw_bytes"]
