"""Content-defined chunking, chunk ids, incremental re-chunking, chunk codecs.

Pure: the only I/O is a caller-supplied ``pread(offset, length) -> bytes``
over the *new* content of a file, so this module works on SRC files, on
restored files and on plain buffers alike, and never imports trio.

Why these choices (measured numbers in docs/format.md, "Chunking"):

* FastCDC (``pyfastcdc``, compiled, releases the GIL) with fixed
  parameters.  The parameters are part of the journal format: changing them
  would make every old chunk list disagree with a fresh chunking, which
  breaks incremental re-chunking and dedup.  They are pinned in
  ``CHUNKER_PARAMS`` and recorded in the journal's meta.
* Chunk id = xxh3-128 of the raw bytes (16 bytes): several GB/s, and 128
  bits make accidental collisions irrelevant at any realistic size.
* A cut decision of this FastCDC reads the chunk's bytes *and the first
  byte after the cut*; it depends on the end of the input only when the
  chunk is cut by EOF or when fewer than ``MAX_SIZE`` bytes remain.  The
  streaming and incremental code below rely on exactly these two facts.
* Holes of sparse files are never read: a caller that knows them
  (``holes``, from SEEK_HOLE/SEEK_DATA) lets :func:`cut_from` produce the
  all-zero chunks of a long zero run without reading or hashing them.
  Zeros are cut at MAX_SIZE (no gear hash ever matches), so every chunk of
  a hole is the same ``ZERO_ID``: a 10 GiB hole costs one stored chunk and
  a list of ids.
* In-place writes (databases, disk images) are cut at fixed 16 KiB-aligned
  offsets instead (``rechunk_aligned``), so a file's chunk list is a
  correct list of its content but not always the content-defined one:
  compare a file with a version at the version's own boundaries
  (``changed_ranges``), never by chunking it afresh.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import itertools
import operator
import threading
from collections import Counter, OrderedDict
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import xxhash
import zstandard
from pyfastcdc import FastCDC

log = logging.getLogger(__name__)

# --- format constants (changing any of them is a journal format change) ---
MIN_SIZE = 4 * 1024
AVG_SIZE = 16 * 1024  # pyfastcdc's mask parameter; real mean is ~AVG+MIN
MAX_SIZE = 64 * 1024
NORMALIZATION = 1
GEAR_SEED = 0
CHUNKER_PARAMS = {
    "algo": "fastcdc2020",
    "min": MIN_SIZE,
    "avg": AVG_SIZE,
    "max": MAX_SIZE,
    "nc": NORMALIZATION,
    "seed": GEAR_SEED,
    "id": "xxh3-128",
}

WINDOW_MAX = 4 * 1024 * 1024  # biggest single pread while streaming
ZSTD_LEVEL = 3
# deltas are small (an edit's worth of literals) and only made when a file is
# edited, so they can afford more effort: level 9 takes 0.2-0.4 ms per chunk
# (level 3: 0.1-0.17) and stores 3-8 % less (12-13: 6-12 % less, but 1.3-2 ms)
ZSTD_DELTA_LEVEL = 9
# longest delta chain: a read decompresses at most this many deltas (10-15 us
# each for a 16 KiB page-sized change).  128 rather than 64: a chain at its
# longest restarts from an ancestor much older than its base, and that delta
# is several times an ordinary one (a SQLite history stores 16 % less)
MAX_DELTA_DEPTH = 128
SKIP_TO_DEPTH = 32  # a base at MAX_DELTA_DEPTH is replaced by its ancestor at this depth
# most deltas a capture decodes to get one base: a base whose chain is not in
# the RawCache within this many steps is cold, and the new chunk is stored
# standalone instead (a fresh chain), so a capture costs O(change) however
# long the history (a restart from the ancestor at SKIP_TO_DEPTH still fits)
CAPTURE_DECODE_MAX = SKIP_TO_DEPTH
# in-place writes (databases, VM images): re-cut the changed chunks at
# multiples of ALIGNED_BLOCK of the file offset (see rechunk_aligned)
ALIGNED_BLOCK = 16 * 1024
ALIGNED_MIN_FILE = 64 * 1024  # smaller files are always chunked by content
# several bases (journal format 9, issue 20): an in-place block whose delta
# against the old block at its offset is still over 1/MULTI_BASE_WORSE of
# it looks for up to MULTI_BASE_MAX - 1 more old blocks of the same capture
# sharing its bytes (a database moving rows between pages): see MultiBase
MULTI_BASE_MAX = 4  # = journal.schema.MAX_BASES
MULTI_BASE_WORSE = 32
MULTI_BASE_WINDOW = 32  # bytes from each anchor: the windows indexed and looked up (MultiBase)
MULTI_BASE_STEP = 64  # anchors: about one per MULTI_BASE_STEP bytes, at least MULTI_BASE_PROBE apart
MULTI_BASE_PROBE = 4
MULTI_BASE_GROUP = 4 << 20  # in-place changed bytes of a capture looked at together
# the extra bases' (depth + 1) together at most: depths add up, and a chain at
# MAX_DELTA_DEPTH restarts from an old ancestor (sqlgrow: 16 stores less than 128)
MULTI_BASE_EXTRA_DEPTH = 16
# appended data (issue 20): a chunk past the old end of a file takes the new
# chunk just before it as its base (new rows after new rows, log lines after
# log lines), for at most APPEND_CHAIN_DEPTH links in a row (then one is
# stored without it and the chain starts again) and from a neighbour under
# SKIP_TO_DEPTH (a log's rewritten tail chunk is the first link).  Short: such a block
# is often rewritten in place later, and its deltas then need the room
# below MAX_DELTA_DEPTH (sqlgrow: 8 stores less than 2, 4, 16 or 32)
APPEND_CHAIN_DEPTH = 8
# a delta against rows that share only short strings costs a level-9
# dictionary compression (4-5x a standalone chunk's CPU): a capture does it
# for its first APPEND_CHAIN_BYTES appended, a bulk append beyond is stored
# as before (a database's or a log's growth between saves is far less)
APPEND_CHAIN_BYTES = 1 << 20

CODEC_RAW = 0  # payload[1:] is the raw chunk (incompressible data)
CODEC_ZSTD_V1 = 1  # payload[1:] is a zstd frame (written by journal formats 1-2)
CODEC_ZSTD_DELTA_V1 = 2  # payload[1:] is a zstd frame, base chunk = raw dict (formats 1-2)
CODEC_ZSTD = 3  # payload[1:] is a magicless zstd frame (no 4-byte magic number)
CODEC_ZSTD_DELTA = 4  # payload[1:] is a magicless zstd frame, base chunk = raw dict
_DELTA_CODECS = (CODEC_ZSTD_DELTA, CODEC_ZSTD_DELTA_V1)

Pread = Callable[[int, int], bytes]
ChunkRef = tuple[bytes, int]  # (chunk id, length); offsets are prefix sums
# holes(offset) -> (start, end) of the first hole at or after offset ((size, size): none left)
Holes = Callable[[int], tuple[int, int]]


_xxh3_128 = xxhash.xxh3_128_digest


def chunk_id(data: bytes | memoryview) -> bytes:
    """The 16-byte id of a chunk: xxh3-128 digest of its raw bytes."""
    return _xxh3_128(data)


_LONG_HOLE = 4 * MAX_SIZE  # a hole a read window stops before
ZERO_CHUNK = memoryview(bytes(MAX_SIZE))  # the chunk every MAX_SIZE of a long zero run is
ZERO_ID = chunk_id(ZERO_CHUNK)


@functools.lru_cache(maxsize=64)
def zero_id(n: int) -> bytes:
    """The id of an all-zero chunk of n bytes (a chunk of a hole: never read, never written)."""
    return ZERO_ID if n == MAX_SIZE else chunk_id(bytes(n))


def _chunker() -> FastCDC:
    # One per call: pyfastcdc objects are documented as not concurrency-safe
    # and construction is cheap.
    return FastCDC(
        AVG_SIZE,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        normalized_chunking=NORMALIZATION,
        seed=GEAR_SEED,
    )


class Span(NamedTuple):
    """A chunk of the new content: where it is and what it is (a tuple: cheap to
    make, a 10 GiB sparse file has 163,840 of them)."""

    id: bytes
    offset: int
    length: int


def cut_from(pread: Pread, start: int, end: int, hint: int = 0,
             holes: Holes | None = None) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, data)`` of the real chunks of ``[start, end)``.

    ``start`` must be a real chunk boundary of the content (0, or a cut
    that the full chunking of this content also makes) and ``end`` its EOF.
    Reads windows of at most ``WINDOW_MAX`` bytes (first one about ``hint``
    bytes, doubling), so no file is ever held whole.  The cut that ends a
    window is an artefact of the window, not a real boundary, unless the
    window ends at EOF or at least ``MAX_SIZE`` bytes follow the chunk's
    start: those chunks are dropped and re-read in the next window.
    ``data`` is a view valid until the next item is requested.

    With ``holes``, a window that starts inside a hole more than MAX_SIZE
    long yields ``ZERO_CHUNK`` (the very object) for each whole MAX_SIZE of
    it, unread: a chunk starting at a real boundary on MAX_SIZE zero bytes
    is cut at MAX_SIZE whatever follows.  A window reading toward a long
    hole stops soon after its start.
    """
    cdc = _chunker()
    pos = start
    win = min(max(hint, 2 * MAX_SIZE), WINDOW_MAX)
    hole = (-1, -1)
    while pos < end:
        n = min(win, end - pos)
        if holes is not None:
            if pos >= hole[1]:
                hole = holes(pos)
            hs, he = hole[0], min(hole[1], end)
            if hs <= pos and he - pos > MAX_SIZE:
                for _ in range((he - pos - 1) // MAX_SIZE):
                    yield pos, ZERO_CHUNK
                    pos += MAX_SIZE
                continue
            # stop reading soon after the start of the next long hole in this window
            h, looked = hole, 0
            while (h[0] <= pos or h[1] - h[0] <= _LONG_HOLE) and h[0] < pos + n and h[1] < end \
                    and looked < 16:
                h, looked = holes(h[1]), looked + 1
            if pos < h[0] < pos + n and h[1] - h[0] > _LONG_HOLE:
                n = min(n, h[0] - pos + 2 * MAX_SIZE)
        buf = pread(pos, n)
        if len(buf) != n:
            raise EOFError(f"short read: wanted {n} bytes at offset {pos}, got {len(buf)}")
        at_eof = pos + n == end
        mv = memoryview(buf)
        consumed = 0
        for ch in cdc.cut_buf(mv):
            a = ch.offset
            if not at_eof and n - a < MAX_SIZE:
                break
            yield pos + a, mv[a : a + ch.length]
            consumed = a + ch.length
        pos += consumed
        win = min(win * 2, WINDOW_MAX)


def chunk_stream(pread: Pread, size: int) -> Iterator[tuple[Span, memoryview]]:
    """Full chunking of a content of ``size`` bytes, streaming."""
    for off, data in cut_from(pread, 0, size):
        yield Span(chunk_id(data), off, len(data)), data


def chunk_bytes(data: bytes) -> list[ChunkRef]:
    """Full chunk list of an in-memory buffer (tests, small files)."""
    return [(s.id, s.length) for s, _ in chunk_stream(_buffer_pread(data), len(data))]


def _buffer_pread(data: bytes) -> Pread:
    mv = memoryview(data)
    return lambda off, n: mv[off : off + n]


# --- incremental re-chunking ---------------------------------------------


class PackedRefs:
    """A chunk list ``[(id, length), ...]`` held packed, in the journal's entry
    form (16-byte id || u32 BE length, 20 bytes an entry), not as Python
    objects: a large capture's new list (a 4 GiB file: ~185,000 chunks) costs
    20 bytes a chunk instead of ~170 (a tuple, the id, its length, a list
    slot), from the re-chunking through the journal's commit, which takes
    the bytes as they are (``packed``).  Reads as a sequence of
    ``(bytes, int)`` pairs; a slice is a PackedRefs; equal to a list or tuple
    of the same pairs."""

    __slots__ = ("packed", "total")
    ENTRY = 20

    def __init__(self, refs: Iterable[ChunkRef] = ()) -> None:
        self.packed = bytearray()
        self.total = 0  # sum of the lengths
        for cid, n in refs:
            self.add(cid, n)

    def add(self, cid: bytes, n: int) -> None:
        if len(cid) != 16:
            raise ValueError("chunk id must be 16 bytes")
        self.packed += cid
        self.packed += n.to_bytes(4, "big")
        self.total += n

    def append(self, ref: ChunkRef) -> None:
        self.add(*ref)

    @classmethod
    def _of(cls, packed: bytearray) -> "PackedRefs":
        out = cls.__new__(cls)
        out.packed = packed
        out.total = sum(int.from_bytes(packed[o + 16 : o + 20], "big") for o in range(0, len(packed), 20))
        return out

    def __len__(self) -> int:
        return len(self.packed) // 20

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, step = k.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return PackedRefs._of(self.packed[start * 20 : max(stop, start) * 20])
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError("chunk list index out of range")
        o = k * 20
        return bytes(self.packed[o : o + 16]), int.from_bytes(self.packed[o + 16 : o + 20], "big")

    def __iter__(self) -> Iterator[ChunkRef]:
        step = 20 * 4096  # copied a block at a time: no export of the buffer held, no copy of it whole
        for at in range(0, len(self.packed), step):
            b = bytes(self.packed[at : at + step])
            for o in range(0, len(b), 20):
                yield b[o : o + 16], int.from_bytes(b[o + 16 : o + 20], "big")

    def __eq__(self, other) -> bool:
        if isinstance(other, PackedRefs):
            return self.packed == other.packed
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == tuple(b) for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"PackedRefs({list(self)!r})"



@dataclass(frozen=True, slots=True)
class Replace:
    """Old chunks ``[old_start, old_start+old_count)`` become ``refs``, the
    chunks ``(id, length)`` of the new content from ``offset`` on.

    Kept as plain pairs, not :class:`Span` objects: a 4 GiB file's re-chunking
    holds ~260,000 of them, and the pairs are the journal's edit as they are."""

    old_start: int
    old_count: int
    refs: list[ChunkRef]
    offset: int = 0

    @property
    def new(self) -> tuple[Span, ...]:
        """The new chunks as spans (with their offsets)."""
        out = []
        off = self.offset
        for cid, n in self.refs:
            out.append(Span(cid, off, n))
            off += n
        return tuple(out)


@dataclass(slots=True)
class Rechunk:
    """The result of :func:`rechunk`: the edit and what it cost."""

    edits: list[Replace]
    bytes_read: int = 0

    @property
    def new_spans(self) -> list[Span]:
        """Every new chunk of the edits, in order, as spans."""
        return [s for r in self.edits for s in r.new]

    def edit_list(self, old: Sequence[ChunkRef] | None = None) -> list[tuple[int, int, list[ChunkRef]]]:
        """The edit in the journal's form: ``[(old_start, old_count, [(id, len)...])]``.

        Given the ``old`` list, chunks a replacement left as they were are
        taken out of it (a whole-file rewrite that changed two chunks
        records two small replacements, not the whole list).
        """
        out: list[tuple[int, int, list[ChunkRef]]] = []
        for r in self.edits:
            refs = r.refs
            if old is None:
                out.append((r.old_start, r.old_count, refs))
            else:
                out.extend(_minimal_replace(old, r.old_start, r.old_count, refs))
        return out


MATCH_LIMIT = 4096  # longest replacement aligned chunk by chunk; longer ones are only trimmed


def _minimal_replace(old: Sequence[ChunkRef], start: int, count: int,
                     refs: list[ChunkRef]) -> list[tuple[int, int, list[ChunkRef]]]:
    """Split one replacement into the runs that really changed."""
    a = list(old[start : start + count])
    p = 0
    while p < len(a) and p < len(refs) and a[p] == refs[p]:
        p += 1
    q = 0
    while q < len(a) - p and q < len(refs) - p and a[-1 - q] == refs[-1 - q]:
        q += 1
    a, b, start = a[p : len(a) - q], refs[p : len(refs) - q], start + p
    if not a and not b:
        return []
    if len(a) + len(b) > MATCH_LIMIT or not a or not b:
        return [(start, len(a), b)]
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return [(start + i1, i2 - i1, b[j1:j2]) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


def apply_edit(old: Sequence[ChunkRef], edits: Sequence, copy: bool = True) -> list[ChunkRef]:
    """Apply ``[(old_start, old_count, new_refs)]`` (sorted, disjoint) to ``old``.

    ``copy=False``: the new refs are already ``(bytes, int)`` tuples (an
    edit a capture built) and the result shares them."""
    out: list[ChunkRef] = []
    cur = 0
    for e in edits:
        if isinstance(e, Replace):
            start, count, new = e.old_start, e.old_count, e.refs
        else:
            start, count, new = e
        if start < cur or start + count > len(old):
            raise ValueError(f"edit ({start}, {count}) out of order or beyond {len(old)} chunks")
        out.extend(old[cur:start])
        if copy:
            out.extend((bytes(i), int(n)) for i, n in new)
        else:
            out.extend(new)
        cur = start + count
    out.extend(old[cur:])
    return out


def list_offsets(refs: Sequence[ChunkRef]) -> list[int]:
    """[0, end of chunk 0, end of chunk 1, ...]: prefix sums of the lengths (C speed)."""
    return [0, *itertools.accumulate(map(operator.itemgetter(1), refs))]


def edit_offsets(offsets: Sequence[int], edits) -> list[int]:
    """``list_offsets(apply_edit(old, edits))`` from the old offsets, cheaply.

    Offsets before an edit are copied; after it they move by the edit's
    size change, which is zero for in-place writes (the chunking
    resynchronises at an old boundary), so a small edit of a huge file's
    list costs a few slices instead of a pass over every chunk.
    """
    out = [0]
    cur = 0
    shift = 0
    for start, count, refs in edits:
        part = offsets[cur + 1 : start + 1]
        out.extend([o + shift for o in part] if shift else part)
        pos = out[-1]
        for _, n in refs:
            pos += n
            out.append(pos)
        cur = start + count
        shift = pos - offsets[cur]
    rest = offsets[cur + 1 :]
    out.extend([o + shift for o in rest] if shift else rest)
    return out


def apply_edit_in_place(refs: list[ChunkRef], offsets: list[int], edits) -> None:
    """``apply_edit`` and ``edit_offsets`` on lists the caller owns, in place.

    A small edit of a huge file's list (65,536 entries per GiB) then costs
    the edit plus, where the size changed, the offsets after it, instead of
    two copies of every entry (~1.5 ms on the bench machine, issue 19).
    ``edits`` as ``apply_edit`` takes them (sorted, disjoint, old indices)."""
    for start, count, new in reversed(edits):
        if start < 0 or start + count > len(refs):
            raise ValueError(f"edit ({start}, {count}) beyond {len(refs)} chunks")
        refs[start:start + count] = new
        pos = offsets[start]
        ends = []
        for _, n in new:
            pos += n
            ends.append(pos)
        shift = pos - offsets[start + count]
        if shift:  # the size changed: every later offset moves (an append's tail is short)
            offsets[start + count + 1:] = [o + shift for o in offsets[start + count + 1:]]
        offsets[start + 1:start + count + 1] = ends  # a memmove at most, when the count changed


def prefers_aligned(old_size: int, new_size: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Is this an in-place write, better cut at fixed aligned offsets?

    ``ranges`` as :func:`normalize_dirty` returns them.  A database or disk
    image rewrites pages where they are: content-defined boundaries gain
    nothing there (nothing shifts), and a page change that moves a cut
    makes its neighbour chunk new too.  In-place means: the file did not
    shrink, some bytes inside the old size changed, but at most half of
    them (a rewrite or an insertion that shifts the rest is content-defined
    work; so is a pure append, which a log does).
    """
    if old_size < ALIGNED_MIN_FILE or new_size < old_size:
        return False
    inside = sum(min(e, old_size) - s for s, e in ranges if s < old_size)
    return 0 < inside <= old_size // 2


def _aligned_cuts(a: int, b: int) -> list[int]:
    """Cut ``[a, b)`` at multiples of ALIGNED_BLOCK; no piece under MIN_SIZE
    unless the whole span is (a short end piece joins its neighbour)."""
    cuts = [a]
    c = (a // ALIGNED_BLOCK + 1) * ALIGNED_BLOCK
    if c - a < MIN_SIZE:
        c += ALIGNED_BLOCK
    while c < b:
        cuts.append(c)
        c += ALIGNED_BLOCK
    if len(cuts) > 1 and b - cuts[-1] < MIN_SIZE:
        cuts.pop()
    cuts.append(b)
    return cuts


def rechunk_aligned(
    pread: Pread,
    new_size: int,
    old: Sequence[ChunkRef],
    ranges: Sequence[tuple[int, int]],
    on_chunk: Callable[[Span, memoryview], None] | None = None,
    offsets: Sequence[int] | None = None,
    holes: Holes | None = None,
) -> Rechunk:
    """Re-chunk an in-place write (:func:`prefers_aligned`) at aligned offsets.

    Each old chunk a dirty range touches is read and hashed: if its bytes
    are unchanged it stays; each run of changed chunks (and whatever lies
    past the old EOF) is cut at multiples of ALIGNED_BLOCK.  The list stays
    a correct list of the content, but no longer the content-defined one:
    a later edit of the same page finds exactly one block to replace.  Only
    the touched chunks are read.
    """
    if offsets is None:
        offsets = list_offsets(old)
    old_size = offsets[-1]
    result = Rechunk(edits=[])
    # old chunk indexes [k, end) touched by the dirty ranges, merged
    runs: list[list[int]] = []
    for s, e in ranges:
        k = min(max(bisect.bisect_right(offsets, s) - 1, 0), len(old))
        end = len(old) if e > old_size else bisect.bisect_left(offsets, e)
        if runs and k <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([k, end])

    def emit(start_k: int, count: int, a: int, b: int) -> None:
        spans = PackedRefs()
        cuts = _aligned_cuts(a, b)
        for x, y in zip(cuts, cuts[1:]):
            data = pread(x, y - x)
            if len(data) != y - x:
                raise EOFError(f"short read: wanted {y - x} bytes at offset {x}, got {len(data)}")
            result.bytes_read += len(data)
            span = Span(chunk_id(data), x, y - x)
            spans.add(span.id, y - x)
            if on_chunk is not None:
                on_chunk(span, memoryview(data))
        result.edits.append(Replace(start_k, count, spans, a))

    def unchanged(j: int) -> bool:
        data = pread(offsets[j], old[j][1])
        result.bytes_read += len(data)
        return chunk_id(data) == old[j][0]

    changed: list[tuple[int, int]] = []  # runs of changed old chunks [first, j)
    for k, end in runs:
        j = k
        while j < end:
            if unchanged(j):
                j += 1
                continue
            first = j
            j += 1
            while j < end and not unchanged(j):
                j += 1
            changed.append((first, j))
    if not changed:
        # nothing inside the old size changed (the kernel's writeback cache
        # rewrites the last page of an appended file): an append, which
        # content-defined chunking stores better
        rest = rechunk(pread, new_size, old, [(old_size, new_size)], on_chunk, offsets, holes=holes)
        rest.bytes_read += result.bytes_read
        return rest
    for first, j in changed:
        emit(first, j - first, offsets[first], new_size if j == len(old) else offsets[j])
    if new_size > old_size and changed[-1][1] < len(old):
        emit(len(old), 0, old_size, new_size)  # appended past an unchanged old tail
    return result


def changed_ranges(pread: Pread, size: int, old: Sequence[ChunkRef],
                   offsets: Sequence[int] | None = None, holes: Holes | None = None) -> list[tuple[int, int]]:
    """Dirty ranges of a file against a chunk list of an older version of it,
    found by hashing the content at the list's boundaries (the whole file
    is read).  For a file changed behind deltafs' back: the list may not be
    the content-defined chunking of its content, so a fresh chunking cannot
    tell which chunks are unchanged.  With ``holes``, an all-zero chunk
    lying in a hole is unchanged without reading it."""
    if offsets is None:
        offsets = list_offsets(old)
    out: list[tuple[int, int]] = []
    hole = (-1, -1)
    for j, (cid, n) in enumerate(old):
        a = offsets[j]
        if a >= size:
            break
        b = min(a + n, size)
        if holes is not None and b - a == n:
            if a >= hole[1]:
                hole = holes(a)
            if hole[0] <= a and b <= hole[1] and cid == zero_id(n):
                continue
        data = pread(a, b - a)
        if b - a != n or chunk_id(data) != cid:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
    if size > offsets[-1]:
        out.append((offsets[-1], size))
    return out


def normalize_dirty(dirty: Sequence[tuple[int, int]], old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Sort, merge and clip dirty ranges; a size change is dirty to EOF.

    The tail range ends at ``new_size + 1`` (past EOF) so it never allows a
    resynchronisation: bytes near EOF decide the last cuts.
    """
    rs = [(max(0, s), min(e, new_size + 1)) for s, e in dirty if e > s and s < new_size]
    if old_size != new_size:
        rs.append((min(old_size, new_size), new_size + 1))
    return merge_ranges(rs)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def rechunk(
    pread: Pread,
    new_size: int,
    old: Sequence[ChunkRef],
    dirty: Sequence[tuple[int, int]],
    on_chunk: Callable[[Span, memoryview], None] | None = None,
    offsets: Sequence[int] | None = None,
    aligned: bool = False,
    holes: Holes | None = None,
) -> Rechunk:
    """Re-chunk only around the dirty ranges; equal to a full re-chunking
    when ``old`` is one (an earlier aligned capture's list is not: the
    result is then still a correct list, and may re-cut up to EOF).

    With ``aligned``, an in-place write (:func:`prefers_aligned`) is cut at
    fixed offsets instead (:func:`rechunk_aligned`), which is not.

    ``old`` is the chunk list of the version the dirty ranges were recorded
    against; ``dirty`` the ``[start, end)`` byte ranges changed since:
    writes, a truncation to p as ``(p, huge)``, an extension from s to e as
    ``(s, e)`` (a truncate-then-extend back to the old size changes bytes
    without changing the size, so the caller must say so).  The net size
    change is also treated as dirty from ``min(old, new)`` to EOF.

    For each dirty range we restart at the last old boundary *strictly
    before* its first byte (a cut decision reads the byte after the cut, so
    a boundary equal to the dirty start is not trustworthy) and cut new
    chunks until a new cut lands on an old boundary with no dirty byte at
    or after it before the next range: from there on the old chunks are
    what a full chunking would produce.  ``on_chunk(span, data)`` sees each
    new chunk's bytes (a view valid during the call), so callers can hash
    and compress without reading twice.  ``holes``: see :func:`cut_from`.
    """
    if offsets is None:
        offsets = list_offsets(old)
    old_size = offsets[-1]
    ranges = normalize_dirty(dirty, old_size, new_size)
    if aligned and prefers_aligned(old_size, new_size, ranges):
        return rechunk_aligned(pread, new_size, old, ranges, on_chunk, offsets, holes)
    result = Rechunk(edits=[])
    cur_k = 0  # old chunks before this index are settled
    i = 0
    while i < len(ranges):
        s, dirty_end = ranges[i]
        k = max(bisect.bisect_left(offsets, s) - 1, 0, cur_k)
        start = offsets[k]
        spans = PackedRefs()  # packed: ~20 bytes a chunk, not ~170 (a 4 GiB file, issue 19)
        packed = spans.packed  # filled here entry by entry (PackedRefs.add, without its call)
        end_k = len(old)
        hint = min(dirty_end, new_size) - start + 2 * MAX_SIZE
        pos = start
        read = total = 0
        for off, data in cut_from(pread, start, new_size, hint, holes):
            n = len(data)
            if data is ZERO_CHUNK:  # a hole: neither read nor hashed
                cid = ZERO_ID
            else:
                read += n
                cid = _xxh3_128(data)
            packed += cid
            packed += n.to_bytes(4, "big")
            total += n
            if on_chunk is not None:
                on_chunk(Span(cid, off, n), data)
            pos = off + n
            while i + 1 < len(ranges) and ranges[i + 1][0] <= pos:
                i += 1
                dirty_end = max(dirty_end, ranges[i][1])
            if pos >= dirty_end and pos < new_size:
                j = bisect.bisect_left(offsets, pos)
                if j < len(offsets) and offsets[j] == pos:
                    end_k = j
                    break
        else:
            end_k = len(old)
        result.bytes_read += read
        spans.total = total
        result.edits.append(Replace(k, end_k - k, spans, start))
        cur_k = end_k
        i += 1
    return result


# --- chunk codecs ----------------------------------------------------------


class Base(NamedTuple):
    """A candidate base for a delta: the old chunk a new chunk replaces."""

    id: bytes
    raw: bytes
    depth: int  # 0 = the base itself is stored standalone


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A chunk ready for the journal (built in capture worker threads)."""

    id: bytes
    raw_len: int
    payload: bytes  # see compress_chunk
    base_id: bytes | None = None  # set iff payload is CODEC_ZSTD_DELTA: the base (the last one, if several)
    depth: int = 0  # 0 standalone, else the sum of (depth + 1) over its bases (<= MAX_DELTA_DEPTH)
    more_bases: tuple[bytes, ...] = ()  # further bases, before base_id in the dictionary (format 9)

    @property
    def bases(self) -> tuple[bytes, ...]:
        """Every base id in dictionary order (empty: standalone)."""
        return (*self.more_bases, self.base_id) if self.base_id is not None else ()


SAMPLE = 4096
_local = threading.local()


def _params(level: int) -> zstandard.ZstdCompressionParameters:
    """Magicless frames with the content size and no dict id (docs/format.md, codecs 3-4)."""
    return zstandard.ZstdCompressionParameters.from_level(
        level, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=True, write_dict_id=False)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A per-thread compressor (zstd contexts are reusable, not thread-safe)."""
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(compression_params=_params(level))
    return c


def _compressible(raw: bytes) -> bool:
    """Does a 4 KiB sample from the middle shrink by at least 3% at level 1?"""
    mid = len(raw) // 2
    sample = raw[mid - SAMPLE // 2 : mid + SAMPLE // 2]
    return len(_compressor(1).compress(sample)) < SAMPLE * 0.97


PROBE_WINDOW = 64  # bytes of the new chunk looked up in the base (find: ~13 GiB/s)
PROBE_COUNT = 8  # windows, evenly spaced across the new chunk


def _shares_with(raw: bytes, base_raw: bytes) -> bool:
    """Does any of PROBE_COUNT evenly spaced PROBE_WINDOW-byte windows of ``raw`` occur in the base?

    A delta pays only for bytes the new chunk shares with its base.  Building
    a zstd dictionary from the base and compressing against it runs at
    ~190 MiB/s; these look-ups (memchr-speed scans) at GB/s, so an overwrite
    with unrelated data (fresh random bytes, a re-encrypted or recompressed
    file) skips the delta.  A chunk sharing less than about 1/PROBE_COUNT of
    its bytes with the base may be missed: such a delta saves little.
    """
    n = len(raw)
    if n <= PROBE_WINDOW or len(base_raw) < PROBE_WINDOW:
        return True  # too small to sample: let the delta decide
    step = (n - PROBE_WINDOW) / (PROBE_COUNT - 1)
    for k in range(PROBE_COUNT):
        o = int(k * step)
        if base_raw.find(raw[o:o + PROBE_WINDOW]) >= 0:
            return True
    return False


def _dict(base_raw: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(bytes(base_raw), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def compress_chunk(raw: bytes | memoryview, base_raw: bytes | None = None, level: int = ZSTD_LEVEL,
                   handicap: float = 1.0, plain: bool = True, probe: bool = True) -> bytes:
    """Encode a chunk: one codec byte then the body (see CODEC_*).

    With ``base_raw`` the chunk is compressed with the base's raw bytes as
    a zstd raw-content dictionary, which finds everything the edit left
    unchanged.  Whatever is smallest wins, raw included, so a payload never
    exceeds ``len(raw) + 1``; only a CODEC_ZSTD_DELTA payload needs a base.
    A delta wins over a standalone encoding only if ``handicap`` times its
    size is still smaller (a delta that lengthens a chain must pay for it).
    ``plain=False``: do not try standalone compression (the caller knows
    the data around this chunk is incompressible; see capture_chunks).
    ``probe=False``: try the delta whenever the chunk compresses, even if no
    long window of it is in the base (new rows or log lines appended after
    similar ones share only short strings: field names, words, formats).
    """
    raw = bytes(raw)
    delta = None
    base_raw = bytes(base_raw) if base_raw else None
    if base_raw and (_shares_with(raw, base_raw) if probe else len(raw) < 2 * SAMPLE or _compressible(raw)):
        cctx = zstandard.ZstdCompressor(compression_params=_params(ZSTD_DELTA_LEVEL), dict_data=_dict(base_raw))
        delta = cctx.compress(raw)
        if len(delta) * 8 * handicap < len(raw):
            return bytes([CODEC_ZSTD_DELTA]) + delta  # the base clearly helped
    best, best_len = None, len(raw) + 1  # CODEC_RAW, built only if nothing beats it
    if plain and (len(raw) < 2 * SAMPLE or _compressible(raw)):  # else random, encrypted or compressed
        body = _compressor(level).compress(raw)
        if len(body) + 1 < best_len:
            best, best_len = bytes([CODEC_ZSTD]) + body, len(body) + 1
    if delta is not None and len(delta) * handicap + 1 < best_len:
        return bytes([CODEC_ZSTD_DELTA]) + delta
    return best if best is not None else _RAW_CODEC + raw


_RAW_CODEC = bytes([CODEC_RAW])


def payload_needs_base(payload: bytes) -> bool:
    return bool(payload) and payload[0] in _DELTA_CODECS


def decompress_chunk(payload: bytes | memoryview, base_raw: bytes | None = None) -> bytes:
    """Inverse of :func:`compress_chunk` (raises ValueError on a bad payload)."""
    payload = memoryview(payload)
    if not len(payload):
        raise ValueError("empty chunk payload")
    codec = payload[0]
    body = payload[1:]
    if codec == CODEC_RAW:
        return bytes(body)
    fmt = zstandard.FORMAT_ZSTD1_MAGICLESS if codec >= CODEC_ZSTD else zstandard.FORMAT_ZSTD1
    if codec in (CODEC_ZSTD, CODEC_ZSTD_V1):
        return zstandard.ZstdDecompressor(format=fmt).decompress(body)
    if codec in _DELTA_CODECS:
        if base_raw is None:
            raise ValueError("delta chunk payload needs its base")
        return zstandard.ZstdDecompressor(dict_data=_dict(base_raw), format=fmt).decompress(body)
    raise ValueError(f"unknown chunk codec {codec}")


def build_chunk(raw: bytes | memoryview, base: Base | None = None, level: int = ZSTD_LEVEL,
                handicap: float = 1.0, cid: bytes | None = None, plain: bool = True,
                probe: bool = True) -> NewChunk:
    """Compress a new chunk, against ``base`` unless its chain is too deep.
    ``cid``: the chunk's id when the caller hashed it already (``chunk_id(raw)``);
    ``plain``, ``probe``: see :func:`compress_chunk`."""
    raw = bytes(raw)
    if cid is None:
        cid = chunk_id(raw)
    if base is not None and (base.depth >= MAX_DELTA_DEPTH or base.id == cid):
        base = None
    payload = compress_chunk(raw, base.raw if base else None, level, handicap, plain, probe)
    if base is not None and payload_needs_base(payload):
        return NewChunk(cid, len(raw), payload, base.id, base.depth + 1)
    return NewChunk(cid, len(raw), payload)


def multi_depth(bases: Sequence[Base]) -> int:
    """Depth of a delta against ``bases``: the sum of (depth + 1) over them.

    A chunk's depth bounds the decompressions a read of it needs (depth + 1,
    whatever its bases share): with one base it is the chain length, as
    before format 9."""
    return sum(b.depth + 1 for b in bases)


def build_chunk_multi(raw: bytes | memoryview, bases: Sequence[Base], cid: bytes | None = None,
                      handicap: float = 1.0) -> NewChunk | None:
    """A delta against several bases (value format 2, docs/format.md): one
    magicless zstd frame whose raw-content dictionary is the bases' raw
    bytes concatenated in order (put the likeliest base last: its bytes are
    nearest).  None when the bases are fewer than two, repeat, include the
    chunk itself or are too deep together."""
    raw = bytes(raw)
    if cid is None:
        cid = chunk_id(raw)
    ids = [b.id for b in bases]
    if not 2 <= len(bases) <= MULTI_BASE_MAX or len(set(ids)) != len(ids) or cid in ids:
        return None
    depth = multi_depth(bases)
    if depth > MAX_DELTA_DEPTH:
        return None
    payload = compress_chunk(raw, b"".join(b.raw for b in bases), handicap=handicap)
    if not payload_needs_base(payload):
        return None
    return NewChunk(cid, len(raw), payload, ids[-1], depth, tuple(ids[:-1]))


class MultiBase:
    """Finds, for a new in-place block, other old blocks sharing its bytes.

    ``olds``: the old blocks of a capture's changed in-place blocks (their
    same-offset bases).  SQLite moves cells between pages when it splits a
    page or inserts into an index, so a changed page's new bytes are often
    in *other* old pages of the same transaction (tools/bench/history_size_delta).
    Windows are taken where the data says, not at fixed offsets, so a run
    of bytes moved by any distance is found: the *anchor* byte is the byte
    value whose share of the old blocks is nearest 1/MULTI_BASE_STEP (free
    space, runs of one byte, left out); the index holds the
    MULTI_BASE_WINDOW bytes from each of its occurrences in the old blocks
    (at least MULTI_BASE_PROBE apart), and a new block's windows at its own
    occurrences are looked up; the old blocks with the most hits are its
    extra bases.  Built lazily: only blocks whose one-base delta stays
    large ask."""

    def __init__(self, olds: Sequence[Base]) -> None:
        self.olds = list(olds)
        self.index: dict[bytes, int] | None = None
        self.anchor = b"\0"

    def _windows(self, raw: bytes) -> Iterator[bytes]:
        W, gap, a, find = MULTI_BASE_WINDOW, MULTI_BASE_PROBE, self.anchor, raw.find
        end = len(raw) - W
        q = find(a)
        while 0 <= q <= end:
            w = raw[q:q + W]
            if w.count(w[:1]) != W:
                yield w
            q = find(a, q + gap)

    def _build(self) -> dict[bytes, int]:
        sample = b"".join(b.raw[:2048] for b in self.olds[:64])
        counts = Counter(sample)
        target = len(sample) / MULTI_BASE_STEP
        best = min(range(256), key=lambda c: (abs(counts.get(c, 0) - target), c))
        self.anchor = bytes((best,))
        index: dict[bytes, int] = {}
        for k, b in enumerate(self.olds):
            for w in self._windows(b.raw):
                index.setdefault(w, k)
        return index

    def find(self, raw: bytes, own: Base, cid: bytes) -> list[Base]:
        """Up to MULTI_BASE_MAX - 1 old blocks, most shared first, that fit
        with ``own`` under MAX_DELTA_DEPTH; never ``own`` or ``cid`` itself."""
        if self.index is None:
            self.index = self._build()
        get, hits = self.index.get, {}
        for w in self._windows(raw):
            k = get(w)
            if k is not None:
                hits[k] = hits.get(k, 0) + 1
        out: list[Base] = []
        budget = min(MAX_DELTA_DEPTH - (own.depth + 1), MULTI_BASE_EXTRA_DEPTH)
        seen = {own.id, cid}
        for k, n in sorted(hits.items(), key=lambda x: -x[1]):
            b = self.olds[k]
            if n < 2 or b.id in seen or b.depth + 1 > budget:
                continue
            seen.add(b.id)
            out.append(b)
            budget -= b.depth + 1
            if len(out) == MULTI_BASE_MAX - 1:
                break
        return out


class BaseFinder:
    """Pick, for each new chunk of a re-chunking, the old chunk it replaces.

    A changed chunk compresses to a few hundred bytes against the old chunk
    holding the same text, and to a full standalone chunk against a
    neighbour.  Offsets alone pick the neighbour whenever the bytes before
    the chunk grew or shrank (a deleted line, a whole-file rewrite by an
    editor), so the finder aligns the two versions on *anchors*: new chunks
    equal to an old chunk near where the shift so far says it should be.
    The new chunks between two anchors replace the old chunks between the
    same anchors and are paired by relative position inside that run.

    Feed every chunk of :func:`rechunk` in order to :meth:`feed`, then call
    :meth:`finish`.  ``emit(span, raw, base)`` receives each chunk that needs
    storing (``raw`` as fed: bytes, or a view of a read window, which every
    ``pread`` returns anew), ``base`` an old ``(id, length)`` or ``None``.  Chunks wait for
    the next anchor at most ``hold`` bytes (then the shift alone decides),
    so memory stays bounded on big rewrites.

    ``same_offset``: nothing shifted (an in-place write, :func:`prefers_aligned`):
    each chunk's base is the old chunk it overlaps most at its own offset, a
    chunk past the old end the last old chunk.  Anchors are then not needed,
    and relative positions would drift as soon as the file also grows.
    """

    def __init__(self, old: Sequence[ChunkRef], offsets: Sequence[int],
                 emit: Callable[[Span, bytes, ChunkRef | None], None], hold: int = 8 << 20,
                 same_offset: bool = False) -> None:
        self.old, self.offsets, self.emit, self.hold = old, offsets, emit, hold
        self.same_offset = same_offset and bool(old)
        self.shift = 0  # new offset - old offset at the last anchor
        self.after = 0  # old index just past the last anchor
        self.pending: list[tuple[Span, bytes]] = []
        self.held = 0

    def _old_index(self, x: float) -> int:
        return min(max(bisect.bisect_right(self.offsets, x) - 1, 0), len(self.old) - 1)

    def _anchor(self, span: Span) -> int | None:
        """Index of the old chunk equal to ``span`` near its expected place."""
        if not self.old:
            return None
        k = self._old_index(span.offset - self.shift)
        for j in range(max(k - 2, 0), min(k + 3, len(self.old))):
            if self.old[j][0] == span.id:
                return j
        return None

    def feed(self, span: Span, raw: bytes | memoryview | None) -> None:
        """One chunk of the new version; ``raw`` is None if it needs no storing."""
        if self.same_offset:
            if raw is not None:
                self.emit(span, raw, self.old[self._overlapping(span)])
            return
        j = self._anchor(span)
        if j is not None:
            self._flush(j)
            self.shift, self.after = span.offset - self.offsets[j], j + 1
            return
        if raw is None:
            return
        if not self.old:
            self.emit(span, raw, None)
            return
        # held as it came (a view of its read window keeps the window, not a
        # copy: at most hold bytes plus one window either way, one copy fewer)
        self.pending.append((span, raw))
        self.held += len(raw)
        if self.held >= self.hold:
            last = self.pending[-1][0]
            self._flush(self._old_index(last.offset + last.length - self.shift) + 1)

    def _overlapping(self, span: Span) -> int:
        """Index of the old chunk sharing the most bytes with ``span``'s offsets."""
        end = span.offset + span.length
        k = self._old_index(span.offset)
        best, most = k, -1
        while k < len(self.old) and self.offsets[k] < end:
            n = min(end, self.offsets[k + 1]) - max(span.offset, self.offsets[k])
            if n > most:
                best, most = k, n
            k += 1
        return best

    def finish(self) -> None:
        if self.pending:
            last = self.pending[-1][0]
            self._flush(self._old_index(last.offset + last.length - 1 - self.shift) + 1)

    def _flush(self, next_old: int) -> None:
        if not self.pending:
            return
        first = self.pending[0][0]
        lo = max(self.after, self._old_index(first.offset - self.shift))
        lo = min(lo, len(self.old) - 1)
        hi = min(max(next_old, lo + 1), len(self.old))
        ostart, olen = self.offsets[lo], self.offsets[hi] - self.offsets[lo]
        last = self.pending[-1][0]
        nstart = first.offset
        nlen = max(last.offset + last.length - nstart, 1)
        for span, raw in self.pending:
            rel = (span.offset + span.length / 2 - nstart) / nlen
            k = min(max(self._old_index(ostart + rel * olen), lo), hi - 1)
            self.emit(span, raw, self.old[k])
        self.pending.clear()
        self.held = 0


class RawCache:
    """Raw bytes of recently built or decoded chunks, up to ``budget`` bytes.

    A chunk a capture just stored is the base of the next capture of the
    same region, so keeping it spares decoding its delta chain again (up to
    MAX_DELTA_DEPTH decompressions) on every save of a hot region.  Shared
    by the capture worker threads.
    """

    def __init__(self, budget: int = 32 << 20) -> None:
        self.budget = budget
        self.size = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cid: bytes) -> bytes | None:
        with self._lock:
            raw = self._d.get(cid)
            if raw is not None:
                self._d.move_to_end(cid)
            return raw

    def put(self, cid: bytes, raw: bytes) -> None:
        if len(raw) > self.budget // 8:
            return
        with self._lock:
            if cid in self._d:
                self._d.move_to_end(cid)
                return
            self._d[cid] = raw
            self.size += len(raw)
            while self.size > self.budget:
                _, old = self._d.popitem(last=False)
                self.size -= len(old)

    def __contains__(self, cid: bytes) -> bool:
        return cid in self._d

    def __len__(self) -> int:
        return len(self._d)

    def shrink(self, budget: int) -> None:
        """Drop the least recently used entries until at most ``budget`` bytes stay
        (the cache's own budget is unchanged: it fills up again)."""
        with self._lock:
            while self.size > budget and self._d:
                _, old = self._d.popitem(last=False)
                self.size -= len(old)

    def discard(self, cid: bytes) -> None:
        """Forget a chunk (one a capture just replaced: its successor is the next base)."""
        with self._lock:
            raw = self._d.pop(cid, None)
            if raw is not None:
                self.size -= len(raw)
