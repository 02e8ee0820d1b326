"""An encrypted mirror: a :class:`~deltafs.mirrors.base.Mirror` that seals
every object it stores in another Mirror (file:// or s3://).

It takes and gives plaintext names and bytes, so the replicator, clone and
verify work on it unchanged; the storage below sees only
``o/<base32 of AES-SIV(name)>`` objects of padded sizes (crypto.py), and
``deltafs-key.json``, the wrapped key, which this class never touches.

Rollback: every object's sealed header carries a version ``seq`` (1 when
created, +1 each time it is replaced) and the write id of the version it
replaced.  A :class:`SeenStore` remembers, per object replaced at least once
(in practice the manifest), the highest version this machine has read or
written; reading an older one, or finding it gone, raises
:class:`~deltafs.mirrors.crypto.MirrorRollbackError`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from . import crypto as C
from .base import Mirror, MirrorObjectMissing, check_range, validate_prefix

log = logging.getLogger(__name__)

ONE_REQUEST_SPAN = 1 << 20  # a range read ending this close to the start: header and blocks in one request


class SeenStore:
    """The highest version of each replaced object seen on this machine, in
    zero or more JSON files (each 0600; several readers and writers merge
    under an flock).  Without files it lives in memory only."""

    def __init__(self, paths: list[str] | tuple[str, ...] = ()) -> None:
        self.paths = list(dict.fromkeys(paths))
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[int, str]] = {}
        for p in self.paths:
            self._merge(self._read(p))

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path, "rb") as f:
                d = json.load(f)
            return {n: (int(v[0]), str(v[1])) for n, v in d.get("objects", {}).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            log.warning("ignoring unreadable mirror state file %s: %s", path, e)
            return {}

    def _merge(self, other: dict) -> bool:
        changed = False
        for n, v in other.items():
            if n not in self._seen or v[0] > self._seen[n][0]:
                self._seen[n] = v
                changed = True
        return changed

    def floor(self, name: str) -> tuple[int, str] | None:
        with self._lock:
            return self._seen.get(name)

    def note(self, name: str, seq: int, write_id: bytes) -> None:
        """Remember version ``seq`` of ``name`` if it is newer (only replaced objects)."""
        if seq < 2:
            return
        with self._lock:
            if not self._merge({name: (seq, write_id.hex())}):
                return
            self._save()

    def add_path(self, path: str) -> None:
        """Keep the versions in ``path`` too, from now on (written at once)."""
        with self._lock:
            if path not in self.paths:
                self.paths.append(path)
            self._merge(self._read(path))
            _write_merged(path, self._seen, None)

    def forget(self, name: str) -> None:
        with self._lock:
            if self._seen.pop(name, None) is not None:
                self._save(forget=name)

    def _save(self, forget: str | None = None) -> None:
        for p in self.paths:
            try:
                _write_merged(p, self._seen, forget)
            except OSError as e:
                log.warning("cannot record the mirror versions seen in %s: %s", p, e)


def _write_merged(path: str, seen: dict, forget: str | None) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        cur = SeenStore._read(path)
        if forget:
            cur.pop(forget, None)
        for n, v in seen.items():
            if n not in cur or v[0] > cur[n][0]:
                cur[n] = v
        write_private(path, json.dumps({"objects": {n: list(v) for n, v in sorted(cur.items())}},
                                       indent=1).encode() + b"\n")
    finally:
        os.close(fd)


def write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically (temp, fsync, rename), mode 0600 whatever the umask."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_blob(backend: Mirror) -> C.KeyBlob | None:
    """The mirror's key blob, or None if it has none."""
    try:
        data = backend.get(C.KEY_BLOB)
    except MirrorObjectMissing:
        return None
    return C.KeyBlob.decode(data, backend.url)


class EncryptedMirror(Mirror):
    """Seals objects into ``backend`` under ``key`` (see the module docstring).

    ``check_blob``: before the first operation, read the mirror's key blob
    and refuse a key that is not its key (a mount's stored key, read
    without the network at start-up).
    """

    def __init__(self, backend: Mirror, key: C.MirrorKey, seen: SeenStore | None = None, *,
                 check_blob: bool = False, whose: str = "the key this journal holds") -> None:
        self.backend = backend
        self.key = key
        self.seen = seen if seen is not None else SeenStore()
        self._versions: dict[str, tuple[int, bytes]] = {}  # name -> (seq, write id) this session read or wrote
        self._lock = threading.Lock()
        self._blob_checked = not check_blob
        self._whose = whose

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def list_page_size(self) -> int:  # type: ignore[override]
        return self.backend.list_page_size

    @list_page_size.setter
    def list_page_size(self, n: int) -> None:
        self.backend.list_page_size = n

    @property
    def on_progress(self):
        """The backend's upload-progress hook (S3), so a stall watch sees sealed uploads move."""
        return getattr(self.backend, "on_progress", None)

    @on_progress.setter
    def on_progress(self, fn) -> None:
        if hasattr(self.backend, "on_progress"):
            self.backend.on_progress = fn

    def __repr__(self) -> str:
        return f"<EncryptedMirror {self.url} key {self.key.key_id}>"

    # -- helpers ----------------------------------------------------------------
    def _ready(self) -> None:
        if self._blob_checked:
            return
        blob = read_blob(self.backend)
        if blob is None:
            self.backend.check()  # an unplugged drive or a missing bucket says so, not "no key blob"
            raise C.MirrorKeyError(f"mirror {self.url} has no key blob ({C.KEY_BLOB}) but this journal holds a "
                                   "key for it: it was replaced or damaged (restore the blob with "
                                   "`deltafs mirror key import`)")
        blob.check_key(self.key, self.url, self._whose)
        self._blob_checked = True

    def _stored(self, name: str) -> str:
        return self.key.encode_name(name)

    def _missing(self, name: str) -> MirrorObjectMissing:
        return MirrorObjectMissing(f"object {name} does not exist in mirror {self.url}")

    def _check_version(self, name: str, meta: C.Meta | None, floor: tuple[int, str] | None) -> None:
        """Rollback check against what was seen before the read started; then remember."""
        if floor is not None:
            if meta is None:
                raise C.MirrorRollbackError(
                    f"mirror {self.url}: {name} is gone, but this machine has seen version {floor[0]} of it: "
                    "the mirror was rolled back or damaged")
            if meta.seq < floor[0]:
                raise C.MirrorRollbackError(
                    f"mirror {self.url}: {name} is version {meta.seq}, but this machine has seen version "
                    f"{floor[0]}: the mirror was rolled back (an older copy was put back)")
        if meta is not None:
            self._remember(name, meta.seq, meta.write_id)

    def _remember(self, name: str, seq: int, write_id: bytes) -> None:
        with self._lock:
            cur = self._versions.get(name)
            if cur is None or seq >= cur[0]:
                self._versions[name] = (seq, write_id)
        self.seen.note(name, seq, write_id)

    def _meta(self, name: str, stored: str) -> C.Meta | None:
        try:
            head = self.backend.get_range(stored, 0, C.HEAD)
        except MirrorObjectMissing:
            return None
        return C.open_meta(self.key, name, head, self.url)

    def _current(self, name: str, stored: str) -> tuple[int, bytes]:
        """(seq, write id) of the version a put replaces."""
        with self._lock:
            cur = self._versions.get(name)
        if cur is not None:
            return cur
        floor = self.seen.floor(name)
        meta = self._meta(name, stored)
        self._check_version(name, meta, floor)
        return (meta.seq, meta.write_id) if meta else (0, C.ZERO_ID)

    # -- Mirror -------------------------------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        stored = self._stored(name)
        self._ready()
        seq, prev = self._current(name, stored)
        blob, meta = C.seal(self.key, name, data, seq + 1, prev)
        self.backend.put(stored, blob)
        self._remember(name, meta.seq, meta.write_id)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        stored = self._stored(name)
        self._ready()
        blob, meta = C.seal(self.key, name, data)
        created = self.backend.put_if_absent(stored, blob)
        if created:
            self._remember(name, meta.seq, meta.write_id)
        return created

    def get(self, name: str) -> bytes:
        stored = self._stored(name)
        self._ready()
        floor = self.seen.floor(name)
        try:
            data = self.backend.get(stored)
        except MirrorObjectMissing:
            self._check_version(name, None, floor)
            raise self._missing(name) from None
        meta, plain = C.open_object(self.key, name, data, self.url)
        self._check_version(name, meta, floor)
        return plain

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        stored = self._stored(name)
        self._ready()
        floor = self.seen.floor(name)
        last = (offset + length - 1) // C.BLOCK if length else offset // C.BLOCK
        guess_end = C.HEAD + (last + 1) * (C.BLOCK + C.TAG)
        one = guess_end <= ONE_REQUEST_SPAN
        try:
            first_bytes = self.backend.get_range(stored, 0, guess_end if one else C.HEAD)
        except MirrorObjectMissing:
            self._check_version(name, None, floor)
            raise self._missing(name) from None
        meta = C.open_meta(self.key, name, first_bytes[:C.HEAD], self.url)
        self._check_version(name, meta, floor)
        end = min(offset + length, meta.length)
        if end <= offset:
            return b""
        first, last = offset // C.BLOCK, (end - 1) // C.BLOCK
        start, span = meta.block_span(first, last)
        if one:
            raw = first_bytes[start:start + span]
        else:
            raw = self.backend.get_range(stored, start, span)
        if len(raw) != span:
            raise C.ObjectTampered(f"mirror {self.url}: {name} is truncated")
        plain = memoryview(C.open_blocks(self.key, name, meta, first, raw, self.url))
        skip = offset - first * C.BLOCK
        return bytes(plain[skip:skip + end - offset])

    def exists(self, name: str) -> bool:
        stored = self._stored(name)
        self._ready()
        return self.backend.exists(stored)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        validate_prefix(prefix)
        self._ready()
        found = []
        for stored, _size in self.backend.list(C.NAME_DIR):
            name = self.key.decode_name(stored)
            if name is None:
                log.debug("mirror %s: %s is not an object of this key; skipped", self.url, stored)
                continue
            if name.startswith(prefix):
                found.append((name, stored))

        def size(item: tuple[str, str]) -> tuple[str, int] | None:
            name, stored = item
            floor = self.seen.floor(name)
            meta = self._meta(name, stored)
            if meta is None:  # deleted while listing
                return None
            self._check_version(name, meta, floor)
            return name, meta.length

        if len(found) > 8:
            with ThreadPoolExecutor(8) as pool:
                sized = list(pool.map(size, found))
        else:
            sized = [size(f) for f in found]
        return iter(sorted((s for s in sized if s is not None), key=lambda s: s[0].encode()))

    def delete(self, name: str) -> None:
        stored = self._stored(name)
        self._ready()
        self.backend.delete(stored)
        with self._lock:
            self._versions.pop(name, None)
        self.seen.forget(name)

    def check(self) -> None:
        self.backend.check()
        self._ready()

    def close(self) -> None:
        self.backend.close()
