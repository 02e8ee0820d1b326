"""Appended data gets a delta base (issue 20).

New rows appended to a database, new lines to a log: a chunk past the old
end of a file had no useful base (the old last chunk, probed for a shared
64-byte window, which rows of fresh values never have), so it was stored
standalone.  It now takes the new chunk just before it as a zstd
dictionary: the field names, words and formats of the rows before it.
Chains of appended chunks are at most chunking.APPEND_CHAIN_DEPTH links long.
"""

from __future__ import annotations

import random

from deltafs import chunking as C

from test_capture_cache import Daemon
from test_multi_base import MOVED, PAGE, _split_pages, _text

WORDS = ("order invoice shipped paid returned cancelled street avenue road north south east west "
         "alpha beta gamma delta kilo lima oscar papa romeo sierra tango victor whiskey yankee "
         "apple banana cherry grape lemon mango melon orange peach pear plum berry").split()


def _rows(rnd: random.Random, n: int) -> bytes:
    """``n`` bytes of SQLite-like rows: an order with a customer, an e-mail,
    items as JSON, an address and a note (values fresh, shapes repeated)."""
    out, size = [], 0
    while size < n:
        name = " ".join(rnd.choice(WORDS).title() for _ in range(2))
        items = ",".join(f'{{"sku":"{rnd.choice(WORDS)}-{rnd.randint(1, 999)}","qty":{rnd.randint(1, 9)},'
                         f'"price":{rnd.randint(100, 99999)}}}' for _ in range(rnd.randint(1, 5)))
        note = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 12)))
        row = (f"\x00{size:08x}{name}{name.replace(' ', '.').lower()}@example.org[{items}]"
               f"{rnd.randint(1, 999)} {rnd.choice(WORDS).title()} Street, {rnd.randint(10000, 99999)}"
               f"{note}{rnd.choice(('new', 'paid', 'shipped'))}{rnd.getrandbits(40)}").encode()
        out.append(row)
        size += len(row)
    return b"".join(out)[:n]


def _stored(d: Daemon) -> int:
    with d.j.reader() as r:
        return r.stats()["stored_bytes"]


def test_appended_rows_are_stored_against_the_rows_before_them(tmp_path):
    d = Daemon(tmp_path)
    rnd = random.Random(20)
    path = d.src / "db"
    path.write_bytes(_rows(rnd, 8 << 20))
    seq = d.capture(b"db")
    grown = []
    for _ in range(3):
        size = path.stat().st_size
        more = _rows(rnd, 200 << 10)
        with open(path, "ab") as f:
            f.write(more)
        before = _stored(d)
        seq = d.capture(b"db", [(size, size + len(more))], seq)
        # what these blocks cost stored standalone (as before: no base shared a 64-byte window)
        alone = sum(len(C.compress_chunk(more[o:o + PAGE])) for o in range(0, len(more), PAGE))
        grown.append((_stored(d) - before, alone))
    print("stored, standalone per append:", grown)
    for cost, alone in grown:
        assert cost < alone * 0.92, grown
    assert d.content(seq) == path.read_bytes()
    with d.j.reader() as r:
        depths = [r.chunk_info(cid).depth for cid, _ in r.chunk_list(seq)]
    assert max(depths) <= C.SKIP_TO_DEPTH + C.APPEND_CHAIN_DEPTH
    assert (v := d.j.verify(full=True)).ok, v.problem
    d.j.close()


def test_a_chain_of_appended_chunks_restarts_at_its_bound(tmp_path):
    """One big append: the chunks chain, one without that base every APPEND_CHAIN_DEPTH + 1,
    for the first APPEND_CHAIN_BYTES; beyond, as before (no level-9 delta per chunk)."""
    d = Daemon(tmp_path)
    rnd = random.Random(21)
    path = d.src / "log"
    path.write_bytes(_rows(rnd, 256 << 10))
    seq = d.capture(b"log")
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(_rows(rnd, 2 << 20))
    seq = d.capture(b"log", [(size, path.stat().st_size)], seq)
    with d.j.reader() as r:
        infos = [(off, r.chunk_info(cid)) for (cid, _), off
                 in zip(r.chunk_list(seq), C.list_offsets(r.chunk_list(seq)))]
    appended = [i.depth for off, i in infos if size <= off < size + C.APPEND_CHAIN_BYTES]
    beyond = [i.depth for off, i in infos if off >= size + C.APPEND_CHAIN_BYTES + C.MAX_SIZE]
    assert len(appended) > 3 * C.APPEND_CHAIN_DEPTH and len(beyond) > 3 * C.APPEND_CHAIN_DEPTH
    assert max(beyond) <= 1, beyond  # standalone, or a delta against the old last chunk
    assert C.APPEND_CHAIN_DEPTH <= max(appended) <= C.SKIP_TO_DEPTH + C.APPEND_CHAIN_DEPTH, appended
    assert sum(1 for x in appended if x == 0) >= len(appended) // (C.APPEND_CHAIN_DEPTH + 1) - 1
    assert d.content(seq) == path.read_bytes()
    d.j.close()


def test_an_append_after_a_block_recoded_against_several_bases_declares_its_true_depth(tmp_path):
    """In-place blocks whose one-base delta stays large are re-coded at the end
    of the group against several bases (deeper): an appended chunk right after
    one must not use it as its base with the depth it had before."""
    d = Daemon(tmp_path)
    rnd = random.Random(22)
    data = bytearray(_text(rnd, PAGE * 64))
    path = d.src / "db"
    path.write_bytes(data)
    seq = d.capture(b"db")
    for _ in range(4):
        dirty = _split_pages(data, rnd)  # rows moved between pages
        # and into the last page: its delta against itself alone stays large
        size = len(data)
        q = MOVED[0] * PAGE
        data[size - PAGE:] = bytes(data[size - PAGE // 2:]) + bytes(data[q:q + PAGE // 2])
        dirty.append((size - PAGE, size))
        more = _rows(rnd, 3 * PAGE)
        data += more
        dirty.append((size, len(data)))
        with open(path, "r+b") as f:
            for a, b in dirty:
                f.seek(a)
                f.write(data[a:b])
        seq = d.capture(b"db", dirty, seq)
    assert d.content(seq) == bytes(data)
    with d.j.reader() as r:
        for cid, _ in r.chunk_list(seq):
            i = r.chunk_info(cid)
            assert i.depth == sum(r.chunk_info(b).depth + 1 for b in i.bases), (i.depth, i.bases)
    assert (v := d.j.verify(full=True)).ok, v.problem
    d.j.close()
