"""verify: walk a journal's hash chain, and with ``full`` every retained
version's chunk list and chunks; stop at the first problem and name it.

Read-only: works on any opener, mounted or not (``deltafs verify``).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from deltafs.chunking import MAX_DELTA_DEPTH, chunk_id, decompress_chunk
from deltafs.errors import CorruptionError

from . import schema as S
from . import seqindex
from .reader import Reader
from .records import ZERO_HASH, check_link


@dataclass
class Problem:
    what: str  # one line
    seq: int | None = None
    path: bytes | None = None
    chunk: str | None = None  # hex id

    def to_dict(self) -> dict:
        return {"seq": self.seq, "path": None if self.path is None else self.path.decode("utf-8", "surrogateescape"),
                "chunk": self.chunk, "what": self.what}


@dataclass
class VerifyResult:
    records: int = 0
    versions_checked: int = 0
    versions_pruned: int = 0
    chunks_checked: int = 0
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "records": self.records, "versions_checked": self.versions_checked,
                "versions_pruned": self.versions_pruned, "chunks_checked": self.chunks_checked,
                "problem": self.problem.to_dict() if self.problem else None}


def verify(r: Reader, full: bool = False) -> VerifyResult:
    """Walk the hash chain of ``r``'s snapshot (and with ``full`` every
    retained version's list and chunks); stop at the first problem and
    name it (seq, path, what)."""
    res = VerifyResult()
    pruned = r.pruned_seqs()
    res.versions_pruned = len(pruned)
    prev, expected, last_hlc = ZERO_HASH, 1, -1
    content: list[tuple[int, bytes]] = []
    index = _Index()
    try:  # streamed: a journal may hold millions of records
        for seq, v in r.raw_records(check=False):
            if seq != expected:
                res.problem = Problem(f"record {expected} is missing (next key is {seq})", expected)
                return res
            rec, problem = check_link(v, seq, prev)
            if problem:
                res.problem = _checkpoint_problem(r, seq) or \
                    Problem(f"record {seq} {problem}", seq, rec.path if rec else None)
                return res
            if rec.hlc <= last_hlc:
                res.problem = Problem(f"record {seq} goes back in time (HLC {rec.hlc} <= {last_hlc})", seq, rec.path)
                return res
            if full and rec.is_content and seq not in pruned:
                content.append((seq, rec.path))
            if full:
                index.add(seq, rec.file_id, rec.path, rec.path2)
            prev, last_hlc, expected = rec.hash, rec.hlc, seq + 1
            res.records += 1
    except CorruptionError as e:  # a record block that cannot be read
        res.problem = Problem(str(e))
        return res
    if not full:
        return res
    try:
        why = index.compare(r)
    except CorruptionError as e:  # a segment that cannot be decoded
        why = str(e)
    if why:
        res.problem = Problem(f"history index: {why}")
        return res
    good: set[bytes] = set()
    for seq, path in content:
        try:
            lst = r.chunk_list(seq)  # checked against the version's size and content hash
        except CorruptionError as e:
            res.problem = Problem(f"version {seq}: {e.detail}", seq, path)
            return res
        except Exception as e:  # noqa: BLE001 - a decode error
            res.problem = Problem(f"version {seq}: its chunk list cannot be rebuilt: {e}", seq, path)
            return res
        for cid, n in lst:
            if cid in good:
                continue
            why = _check_chunk(r, cid, n, good)
            if why:
                res.problem = Problem(f"version {seq}: {why}", seq, path, cid.hex())
                return res
        res.versions_checked += 1
    res.chunks_checked = len(good)
    res.problem = _checkpoint_problem(r)
    return res


def _checkpoint_problem(r: Reader, seq: int | None = None) -> Problem | None:
    """A damaged chunk-list checkpoint, if reads went around one (Reader:
    derived data, the records are intact).  ``seq``: a record whose link
    failed as verify read it (blocks unchecked): read it the way every
    other reader does first, which goes around a damaged checkpoint."""
    if seq is not None:
        try:
            r.raw_record(seq)
        except CorruptionError:
            return None
    notes = r.damaged_checkpoints()
    if not notes:
        return None
    return Problem(f"{notes[0]} (derived data: the records are intact and every version still "
                   "reads back, rebuilt from them)", seq)


def _check_chunk(r, cid: bytes, length: int, good: set[bytes], depth: int = 0) -> str | None:
    """-> why chunk ``cid`` is bad, or None (and it and its bases join ``good``)."""
    try:
        v = r.raw_chunk(cid)
    except Exception as e:  # noqa: BLE001 - CorruptionError: pack missing or short
        return f"chunk {cid.hex()} cannot be read: {e}"
    if v is None:
        return f"chunk {cid.hex()} is missing"
    if depth > MAX_DELTA_DEPTH:
        return f"chunk {cid.hex()}: delta chain loops"
    try:
        _, raw_len, bases, payload = S.decode_chunk(v)
    except Exception as e:  # noqa: BLE001
        return f"chunk {cid.hex()} has a bad header: {e}"
    base_raw = None
    if bases:
        for base in bases:
            if base not in good:
                why = _check_chunk(r, base, -1, good, depth + 1)
                if why:
                    return f"base of chunk {cid.hex()}: {why}"
            if r.chunk_refs(base) == 0:
                return f"chunk {cid.hex()}: its base {base.hex()} has no reference count"
        try:
            base_raw = b"".join(r.read_chunk(base) for base in bases)
        except Exception as e:  # noqa: BLE001 - CorruptionError: over the decoding bound
            return f"chunk {cid.hex()}: its bases cannot be read: {e}"
    try:
        raw = decompress_chunk(payload, base_raw)
    except Exception as e:  # noqa: BLE001
        return f"chunk {cid.hex()} does not decompress: {e}"
    if len(raw) != raw_len:
        return f"chunk {cid.hex()} decompresses to {len(raw)} bytes but its header says {raw_len}"
    if length >= 0 and raw_len != length:
        return f"chunk {cid.hex()} holds {raw_len} bytes but the chunk list names it with {length}"
    if chunk_id(raw) != cid:
        return f"chunk {cid.hex()} is corrupt: its content does not match its id"
    good.add(cid)
    return None


class _Index:
    """What ``history`` and ``pathlog`` must hold, from the records: every
    record's seq under its file id and under the key of its path and path2
    (seqindex.py; format 13: segments and duplicates, read back merged)."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, object], array] = {}
        self.count = 0

    def add(self, seq: int, file_id: int, path: bytes, path2: bytes | None) -> None:
        keys = {("history", file_id)} | {("pathlog", S.path_key(p)) for p in (path, path2) if p is not None}
        for k in keys:
            a = self.keys.get(k)
            if a is None:
                a = self.keys[k] = array("Q")
            a.append(seq)
        self.count += len(keys)

    def compare(self, r: Reader) -> str | None:
        db = r.dbs[S.DB_HISTORY]
        archived = r.archived_upto()
        n = 0
        for (kind, key), want in self.keys.items():
            if kind == "history":
                live, prefix = seqindex.history_keys(key)
                name = f"file {key:016x}"
            else:
                live, prefix = S.PATH_PREFIX + key, seqindex.SEGMENT_PATH_PREFIX + key
                name = f"path {bytes(key[:60])!r}"
            got = seqindex.seqs(r.txn, db, live, prefix)
            if got != list(want):
                return f"{kind} of {name} names records {_short(got)}, its records are {_short(want)}"
            n += len(got)
        total = 0
        for kind, key, seq, packed in seqindex.all_entries(r.txn, db):
            total += 1
            if packed != (seq <= archived):  # segments: the records in blocks; duplicates: the rest
                return (f"{kind} record {seq} is {'in a segment' if packed else 'a duplicate'} but "
                        f"{'not ' if packed else ''}in a record block (blocks end at {archived})")
        if total != n:
            return f"{total - n} entries name records that are not about their file or path"
        return None


def _short(seqs) -> str:
    seqs = list(seqs)
    return str(seqs) if len(seqs) <= 8 else f"[{', '.join(map(str, seqs[:4]))}, ... {len(seqs)} in all]"
