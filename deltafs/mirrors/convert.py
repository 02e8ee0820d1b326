"""Copy a mirror into another, object by object, checking as it goes:
``deltafs mirror sync URL --to-encrypted NEW_URL`` (a plain mirror made
encrypted, or an encrypted one moved to a new key).

Works on any two Mirrors (plain or sealed): what it reads is checked
(every pack hashes to its name, the records of every segment continue the
hash chain), objects the destination has already are skipped, and the
manifest is written last, so an interrupted copy is resumed by running it
again and a reader never sees a manifest naming a missing object.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from deltafs.errors import MirrorError
from deltafs.journal import ZERO_HASH, check_link

from . import format as F
from .base import Mirror
from .clone import require_manifest
from .replicate import load_manifest

log = logging.getLogger(__name__)


@dataclass
class CopyReport:
    source: str
    dest: str
    journal_id: str = ""
    last_seq: int = 0
    objects: int = 0  # copied now
    skipped: int = 0  # already in the destination
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def copy_mirror(src: Mirror, dst: Mirror) -> CopyReport:
    t0 = time.monotonic()
    m = require_manifest(src)
    rep = CopyReport(src.url, dst.url, m.journal_id, m.last_seq)
    have = load_manifest(dst)
    if have is not None and (have.journal_id != m.journal_id or have.last_seq > m.last_seq):
        raise MirrorError(f"mirror {dst.url} already holds another copy (journal {have.journal_id}, record "
                          f"{have.last_seq}); copy into an empty mirror")

    def copy(name: str, check, need: bool = False) -> bytes | None:
        """Copy ``name`` unless the destination has it; -> its bytes if ``need``."""
        if dst.exists(name):
            rep.skipped += 1
            return dst.get(name) if need else None
        data = src.get(name)
        check(data, name)
        dst.put_if_absent(name, data)
        rep.objects += 1
        rep.bytes += len(data)
        return data

    for p in m.packs:
        copy(p["name"], lambda data, name: F.decode_pack(data, name, src.url))
    prev, expect = ZERO_HASH, 1
    for seg in m.segments:
        name = seg["name"]
        if seg["first"] != expect:
            raise F.MirrorCorruptError(f"mirror {src.url}: segment {name} starts at {seg['first']}, "
                                       f"expected record {expect}")
        d = F.decode_segment(copy(name, lambda data, n: F.decode_segment(data, n, src.url), need=True),
                             name, src.url)
        if d["journal_id"] != m.journal_id:
            raise F.MirrorCorruptError(f"mirror {src.url}: segment {name} belongs to journal {d['journal_id']}")
        for value in d["r"]:
            r, problem = check_link(value, expect, prev)
            if r is None or problem:
                raise F.MirrorCorruptError(f"mirror {src.url}: segment {name}: record {expect} "
                                           f"{problem or 'cannot be read'}")
            prev, expect = r.hash, expect + 1
        if prev.hex() != seg["last_hash"]:
            raise F.MirrorCorruptError(f"mirror {src.url}: segment {name} does not end where the manifest says")
    if m.snapshots:
        copy(m.snapshots, lambda data, name: F.decode_snapshots(data, name, src.url))
    m.updated_ns = time.time_ns()
    dst.put(F.MANIFEST, m.encode())
    rep.seconds = time.monotonic() - t0
    log.info("copied mirror %s to %s: %d objects (%d bytes), %d already there", src.url, dst.url, rep.objects,
             rep.bytes, rep.skipped)
    return rep
