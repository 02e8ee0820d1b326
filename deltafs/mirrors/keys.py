"""Finding the key of an encrypted mirror: passphrases, key files, the key a
journal keeps, and opening a mirror for the right reader (docs/mirrors.md,
"Encrypted mirrors").

* A **passphrase** comes from ``--passphrase-file FILE``, else
  ``$DELTAFS_PASSPHRASE``, else an interactive prompt (the CLI passes one
  when stdin is a terminal).  It is never put on a command line, in a log
  or in the mount table.
* A **key file** (``--key-file``) holds the unwrapped data key
  (``deltafs mirror key export``).
* A **journal** keeps the data key of each encrypted mirror it replicates
  to in ``JOURNAL/keys/`` (0700; files 0600), so mounts need no passphrase:
  that machine holds the plaintext anyway.  Beside it, the highest
  manifest versions seen (rollback detection); every reader also records
  them per user in ``$XDG_STATE_HOME/deltafs/mirrors/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from deltafs.errors import MirrorError

from . import crypto as C
from .base import Mirror
from .encrypted import EncryptedMirror, SeenStore, read_blob, write_private
from .format import MANIFEST

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "DELTAFS_PASSPHRASE"
NEW_PASSPHRASE_ENV = "DELTAFS_NEW_PASSPHRASE"
SOURCE_PASSPHRASE_ENV = "DELTAFS_FROM_PASSPHRASE"  # mirror sync --to-encrypted: the mirror copied from
KEYS_DIR = "keys"


# --- secrets the user gives --------------------------------------------------------


@dataclass
class Secrets:
    """Where this command may take a passphrase or key from."""

    passphrase_file: str | None = None
    key_file: str | None = None
    prompt: Callable[[str], str] | None = None  # None: not interactive
    env_var: str = PASSPHRASE_ENV

    def passphrase(self, url: str, *, new: bool = False, what: str = "passphrase") -> bytes:
        if self.passphrase_file:
            pw = _read_secret_file(self.passphrase_file, "passphrase file").rstrip(b"\r\n")
        elif os.environ.get(self.env_var):
            pw = os.environ[self.env_var].encode()
        elif self.prompt is not None:
            pw = self.prompt(f"{what} for {url}: ").encode()
            if new and self.prompt(f"{what} again: ").encode() != pw:
                raise C.MirrorKeyError("the passphrases do not match")
        else:
            how = "--key-file FILE, " if not new else ""
            raise C.MirrorKeyError(f"mirror {url} is encrypted and no {what} was given: use {how}"
                                   f"--passphrase-file FILE or ${self.env_var}, or run it on a terminal")
        if not pw:
            raise C.MirrorKeyError("an empty passphrase is not allowed")
        return pw

    def has_passphrase(self) -> bool:
        return bool(self.passphrase_file or os.environ.get(self.env_var) or self.prompt)

    def load_key_file(self) -> C.MirrorKey:
        return C.parse_key_file(_read_secret_file(self.key_file, "key file").decode("utf-8", "replace"),
                                self.key_file)


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as e:
        raise C.MirrorKeyError(f"cannot read {what} {path}: {e.strerror or e}") from None


def write_key_file(path: str, key: C.MirrorKey, url: str) -> None:
    """Create a key file (0600); an existing file is never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise C.MirrorKeyError(f"{path} exists; a key file is never overwritten") from None
    except OSError as e:
        raise C.MirrorKeyError(f"cannot create key file {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, C.export_key(key, url).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the mirror's key blob -----------------------------------------------------------


def has_sealed_objects(backend: Mirror) -> bool:
    return next(iter(backend.list(C.NAME_DIR)), None) is not None


def write_blob(backend: Mirror, blob: C.KeyBlob, *, replace: bool) -> None:
    if replace:
        backend.put(C.KEY_BLOB, blob.encode())
    elif not backend.put_if_absent(C.KEY_BLOB, blob.encode()):
        raise MirrorError(f"mirror {backend.url} got a key blob from someone else meanwhile; run the command again")


# --- keys kept locally -------------------------------------------------------------------


def user_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "deltafs", "mirrors")


class KeyStore:
    """``JOURNAL/keys/``: the data keys of a journal's encrypted mirrors, by URL."""

    def __init__(self, journal_dir: str) -> None:
        self.dir = os.path.join(journal_dir, KEYS_DIR)

    def _path(self, url: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(url.encode()).hexdigest()[:24] + ".key")

    def load(self, url: str) -> C.MirrorKey | None:
        try:
            with open(self._path(url), "rb") as f:
                d = json.load(f)
            if d["url"] != url:
                return None
            key = C.MirrorKey(base64.b64decode(d["key"]), bytes.fromhex(d["mirror_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MirrorError(f"the stored key of mirror {url} ({self._path(url)}) cannot be read: {e}") from None
        return key

    def save(self, url: str, key: C.MirrorKey) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        d = {"url": url, "mirror_id": key.mirror_id.hex(), "key_id": key.key_id,
             "key": base64.b64encode(key.data_key).decode()}
        write_private(self._path(url), json.dumps(d, indent=1).encode() + b"\n")
        log.info("stored the key %s of mirror %s in %s", key.key_id, url, self.dir)

    def remove(self, url: str) -> bool:
        try:
            os.unlink(self._path(url))
            return True
        except FileNotFoundError:
            return False

    def seen_path(self, mirror_id: bytes) -> str:
        return os.path.join(self.dir, mirror_id.hex() + ".seen")


def key_to_wire(key: C.MirrorKey) -> dict:
    """The key as a control-socket request field (``mirror add`` while mounted)."""
    return {"data_key": base64.b64encode(key.data_key).decode(), "mirror_id": key.mirror_id.hex()}


def key_from_wire(d) -> C.MirrorKey:
    from deltafs.errors import UsageError

    try:
        return C.MirrorKey(base64.b64decode(d["data_key"], validate=True), bytes.fromhex(d["mirror_id"]))
    except (KeyError, TypeError, ValueError):
        raise UsageError('"key" must be {"data_key": base64, "mirror_id": hex}') from None


def seen_store(key: C.MirrorKey, journal_dirs: tuple[str, ...] = ()) -> SeenStore:
    paths = [os.path.join(user_state_dir(), key.mirror_id.hex() + ".json")]
    paths += [KeyStore(j).seen_path(key.mirror_id) for j in journal_dirs]
    return SeenStore(paths)


# --- opening ---------------------------------------------------------------------------


def open_for_journal(backend: Mirror, journal_dir: str) -> Mirror:
    """``backend`` as a journal's replicator sees it: sealed with the key the
    journal keeps for its URL (checked against the mirror at first use), or
    plain.  No network here."""
    key = KeyStore(journal_dir).load(backend.url)
    if key is None:
        return backend
    return EncryptedMirror(backend, key, seen_store(key, (journal_dir,)), check_blob=True)


def unlock(backend: Mirror, blob: C.KeyBlob, secrets: Secrets, *, stored: C.MirrorKey | None = None) -> C.MirrorKey:
    """The data key of an encrypted mirror: from the key file, the stored key, or the passphrase."""
    if secrets.key_file:
        key = secrets.load_key_file()
        blob.check_key(key, backend.url, f"the key file {secrets.key_file}")
        return key
    if stored is not None and (stored.key_id == blob.key_id or not secrets.has_passphrase()):
        blob.check_key(stored, backend.url, "the key this journal holds")
        return stored
    return blob.unwrap(secrets.passphrase(backend.url), backend.url)


def open_reader(backend: Mirror, secrets: Secrets, journal_dirs: tuple[str, ...] = ()) -> Mirror:
    """``backend`` for a reader (clone, verify, export): plain, or unlocked.

    The key blob tells whether the mirror is encrypted; its key then comes
    from --key-file, the key a journal in ``journal_dirs`` keeps, or the
    passphrase.  Nothing but the blob is read before a wrong key is found.
    """
    blob = read_blob(backend)
    if blob is None:
        if secrets.key_file:
            if has_sealed_objects(backend):
                raise missing_blob(backend.url)
            raise C.MirrorKeyError(f"mirror {backend.url} is not encrypted; --key-file is for encrypted mirrors")
        if has_sealed_objects(backend):
            raise missing_blob(backend.url)
        return backend
    stored = next((k for k in (KeyStore(j).load(backend.url) for j in journal_dirs) if k is not None), None)
    key = unlock(backend, blob, secrets, stored=stored)
    mirror = EncryptedMirror(backend, key, seen_store(key, journal_dirs))
    if not mirror.exists(MANIFEST) and has_sealed_objects(backend):
        raise C.KeyBlobCorrupt(f"mirror {backend.url}: its key blob does not open its objects (no manifest sealed "
                               "with that key): the blob was replaced; restore it with `deltafs mirror key import`")
    return mirror


def missing_blob(url: str) -> MirrorError:
    return MirrorError(f"mirror {url} holds encrypted objects but no key blob ({C.KEY_BLOB}): restore it with "
                       "`deltafs mirror key import URL KEYFILE`")


def create(backend: Mirror, secrets: Secrets) -> tuple[EncryptedMirror, C.MirrorKey]:
    """Make ``backend`` (empty) an encrypted mirror with a new key.

    With ``secrets.key_file`` (a path that must not exist yet) the new key
    is written there, and a passphrase slot is added only if a passphrase
    is given (file or environment); else a passphrase is required.
    """
    if backend.exists(MANIFEST):
        raise MirrorError(f"mirror {backend.url} holds a plain (unencrypted) mirror: encrypt a copy of it with "
                          f"`deltafs mirror sync {backend.url} --to-encrypted NEW_URL`")
    if has_sealed_objects(backend):
        raise missing_blob(backend.url)
    if secrets.key_file and os.path.lexists(secrets.key_file):
        raise C.MirrorKeyError(f"{secrets.key_file} exists, and a new encrypted mirror gets a new key: give a "
                               "--key-file path that does not exist yet")
    key = C.MirrorKey.generate()
    passphrase = None
    if not secrets.key_file or secrets.passphrase_file or os.environ.get(secrets.env_var):
        passphrase = secrets.passphrase(backend.url, new=True, what="new passphrase")
    if secrets.key_file:
        write_key_file(secrets.key_file, key, backend.url)
    kdf = C.calibrate() if passphrase is not None else None
    write_blob(backend, C.KeyBlob.create(key, passphrase, kdf), replace=False)
    log.info("created encrypted mirror %s (key %s)", backend.url, key.key_id)
    return EncryptedMirror(backend, key, seen_store(key)), key


def add_or_unlock(backend: Mirror, secrets: Secrets, *, encrypt: bool,
                  stored: C.MirrorKey | None = None) -> C.MirrorKey | None:
    """``mirror add`` / ``mount --mirror``: the key of an encrypted mirror
    (unlocked, or a new one with ``encrypt`` on an empty mirror), None for a
    plain mirror (refused with ``encrypt``)."""
    blob = read_blob(backend)
    if blob is not None:
        return unlock(backend, blob, secrets, stored=stored)
    if not encrypt:
        if has_sealed_objects(backend):
            raise missing_blob(backend.url)
        if secrets.key_file:
            raise C.MirrorKeyError(f"mirror {backend.url} is not encrypted: --key-file opens encrypted mirrors "
                                   "(add --encrypt to make a new one)")
        return None
    return create(backend, secrets)[1]


def passwd(backend: Mirror, old: Secrets, new: Secrets) -> C.KeyBlob:
    """Wrap the data key under a new passphrase (new Argon2 parameters)."""
    blob = read_blob(backend)
    if blob is None:
        raise C.MirrorKeyError(f"mirror {backend.url} is not encrypted (it has no {C.KEY_BLOB})")
    key = unlock(backend, blob, old)
    pw = new.passphrase(backend.url, new=True, what="new passphrase")
    nb = C.KeyBlob.create(key, pw, C.calibrate())
    write_blob(backend, nb, replace=True)
    return nb


def import_key(backend: Mirror, key: C.MirrorKey, new: Secrets, *, key_file: str) -> bool:
    """Write a key blob for ``key`` (from a backup) with a new passphrase: for a
    lost or corrupted blob, or a forgotten passphrase.  -> a blob was there."""
    try:
        blob = read_blob(backend)
    except C.KeyBlobCorrupt:
        blob = None  # exactly what import repairs
        had = True
    else:
        had = blob is not None
    if blob is not None:
        blob.check_key(key, backend.url, f"the key file {key_file}")
    else:
        if not had and backend.exists(MANIFEST):
            raise C.MirrorKeyError(f"mirror {backend.url} is a plain (unencrypted) mirror; a key cannot be imported")
        if has_sealed_objects(backend) and not EncryptedMirror(backend, key).exists(MANIFEST):
            raise C.MirrorKeyError(f"the key file {key_file} does not open mirror {backend.url} (no manifest "
                                   "sealed with it): it is the key of another mirror")
    pw = new.passphrase(backend.url, new=True, what="new passphrase")
    write_blob(backend, C.KeyBlob.create(key, pw, C.calibrate()), replace=True)
    return had


def export_key(backend: Mirror, secrets: Secrets, journal_dirs: tuple[str, ...] = ()) -> C.MirrorKey:
    """The data key for ``mirror key export``: the one a journal keeps, else unlocked."""
    mirror = open_reader(backend, secrets, journal_dirs)
    key = getattr(mirror, "key", None)
    if key is None:
        raise C.MirrorKeyError(f"mirror {backend.url} is not encrypted: it has no key to export")
    return key


def remember_in(mirror: Mirror, journal_dir: str) -> None:
    """Record the versions ``mirror`` has seen in ``journal_dir`` too (a clone's journal)."""
    if isinstance(mirror, EncryptedMirror):
        mirror.seen.add_path(KeyStore(journal_dir).seen_path(mirror.key.mirror_id))
