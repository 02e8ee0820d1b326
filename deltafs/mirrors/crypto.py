"""Cryptography of encrypted mirrors: keys, KDF, key wrapping, object AEAD,
keyed names, padding (docs/format.md "Encrypted mirrors").  Pure: no I/O
but ``os.urandom``; ``encrypted.py`` moves the bytes, ``keys.py`` finds
the secrets.

* A mirror has one random 256-bit **data key** and a random ``mirror_id``.
  Subkeys come from HKDF-SHA256 (one per purpose); the **key id** (HMAC of
  the mirror id) tells keys apart without revealing them.
* The data key is stored in the mirror only **wrapped**: AES-256-GCM under a
  key derived from the passphrase with Argon2id (parameters calibrated on
  the machine that wrote them, stored beside the wrapped key), the key
  blob's other fields bound in as associated data.
* Every object is sealed under a key of its own (HKDF of the data key with a
  random 32-byte salt), in 64 KiB blocks of AES-256-GCM: counter nonces with
  a last-block flag, the object's role and name as associated data.  A
  sealed header carries the plaintext length, the padded length, and the
  object's version ``seq`` with the write id of the version it replaced.
* Object names are AES-SIV encryptions of the plaintext names (deterministic
  and keyed: the same name always gives the same stored name, so retries
  stay idempotent; a reader with the key can list).
* Plaintext is padded to a bucket before sealing (Padmé, at least 512
  bytes: at most 6.25 % more, sizes reveal their top few bits only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deltafs.errors import EXIT_USAGE, MirrorError

from .base import MirrorNameError, validate_name
from .format import KEY_BLOB

KEY_LEN = 32
MIRROR_ID_LEN = 16
CIPHER = "aes-256-gcm"
BLOB_FORMAT = 1  # the key blob's format (docs/format.md)

# --- errors --------------------------------------------------------------------


class MirrorKeyError(MirrorError):
    """A key or passphrase problem the user can fix: wrong passphrase, wrong
    key file, no secret given.  Bad input: exit status 2."""

    exit_code = EXIT_USAGE


class KeyBlobCorrupt(MirrorError):
    """The mirror's key blob cannot be read (exit 5)."""


class ObjectTampered(MirrorError):
    """An encrypted object fails authentication: flipped, truncated, swapped,
    or sealed with another key (exit 5)."""


class MirrorRollbackError(MirrorError):
    """An object is older than a version this machine has seen (exit 5)."""


# --- keys ----------------------------------------------------------------------


def _hkdf(key: bytes, info: bytes, length: int = KEY_LEN, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def key_id_of(data_key: bytes, mirror_id: bytes) -> str:
    """16 hex digits naming a data key (of one mirror); reveals nothing of it."""
    return hmac.new(data_key, b"deltafs-key-id-v1" + mirror_id, hashlib.sha256).hexdigest()[:16]


class MirrorKey:
    """A mirror's unwrapped data key and the subkeys derived from it."""

    def __init__(self, data_key: bytes, mirror_id: bytes) -> None:
        if len(data_key) != KEY_LEN or len(mirror_id) != MIRROR_ID_LEN:
            raise ValueError("bad key or mirror id length")
        self.data_key = data_key
        self.mirror_id = mirror_id
        self.key_id = key_id_of(data_key, mirror_id)
        self._names = AESSIV(_hkdf(data_key, b"deltafs-names-v1" + mirror_id, 64))
        self._objects = _hkdf(data_key, b"deltafs-objects-v1" + mirror_id)

    @classmethod
    def generate(cls) -> MirrorKey:
        return cls(os.urandom(KEY_LEN), os.urandom(MIRROR_ID_LEN))

    def __repr__(self) -> str:  # never the key itself
        return f"<MirrorKey {self.key_id} of mirror {self.mirror_id.hex()}>"

    # -- names ------------------------------------------------------------------
    def encode_name(self, name: str) -> str:
        """The stored name of ``name``: NAME_DIR + base32 of its AES-SIV encryption,
        cut into parts of at most NAME_PART characters."""
        validate_name(name)
        raw = name.encode()
        bucket = next((b for b in NAME_BUCKETS if len(raw) <= b), None)
        if bucket is None:
            raise MirrorNameError(f"object name of {len(raw)} bytes is too long for an encrypted mirror "
                                  f"(max {NAME_BUCKETS[-1]})")
        ct = self._names.encrypt(raw.ljust(bucket, b"\0"), [b"deltafs-name-v1"])
        text = base64.b32encode(ct).decode().rstrip("=").lower()
        return NAME_DIR + "/".join(text[i:i + NAME_PART] for i in range(0, len(text), NAME_PART))

    def decode_name(self, stored: str) -> str | None:
        """The plaintext name of a stored name, None if it is not one of ours."""
        if not stored.startswith(NAME_DIR):
            return None
        text = stored[len(NAME_DIR):].replace("/", "").upper()
        try:
            ct = base64.b32decode(text + "=" * (-len(text) % 8))
            raw = self._names.decrypt(ct, [b"deltafs-name-v1"])
            return raw.rstrip(b"\0").decode()
        except (ValueError, InvalidTag, UnicodeDecodeError):
            return None

    # -- objects ----------------------------------------------------------------
    def object_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._objects, b"deltafs-object-v1", salt=salt))


NAME_DIR = "o/"
NAME_BUCKETS = (128, 256, 512)  # plaintext names are NUL-padded to one of these
NAME_PART = 240

# --- padding -------------------------------------------------------------------

MIN_BUCKET = 512
MiB = 1 << 20


def padded_size(n: int) -> int:
    """The bucket ``n`` plaintext bytes are padded to: Padmé (Nikitin et al.,
    "Reducing Metadata Leakage from Encrypted Files and Communication with
    PURBs", PETS 2019), at least 512 bytes.  With E = floor(log2 n), n is
    rounded up to a multiple of 2^(E - bitlen(E)): a size reveals its top
    bitlen(E) + 1 bits only (1 MiB to 32 KiB, 16 MiB to 512 KiB), and the
    overhead is at most 6.25 % above 512 bytes (powers of two: up to 100 %)."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    e = n.bit_length() - 1
    mask = (1 << (e - e.bit_length())) - 1
    return (n + mask) & ~mask


# --- sealed objects --------------------------------------------------------------

MAGIC = b"DFSENC1\n"
SALT_LEN = 32
BLOCK = 64 << 10
TAG = 16
_META = struct.Struct(">QQQ32s")  # plain length, padded length, seq, prev write id
HEAD = len(MAGIC) + SALT_LEN + _META.size + TAG  # 112
ZERO_ID = b"\0" * 32
_META_NONCE = b"\xff" * 11 + b"\x02"


def role_of(name: str) -> str:
    """The role bound into an object with its name: manifest, segments, packs..."""
    if name == "manifest.json":
        return "manifest"
    return name.split("/", 1)[0] if "/" in name else "object"


def _aad(name: str, salt: bytes) -> bytes:
    return MAGIC + salt + role_of(name).encode() + b"\0" + name.encode()


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def stored_size(padded: int) -> int:
    return HEAD + padded + TAG * -(-padded // BLOCK)


@dataclass(frozen=True)
class Meta:
    """An object's sealed header."""

    length: int  # plaintext bytes
    padded: int  # bytes sealed (plaintext + zero padding)
    seq: int  # 1 for a new object, +1 for each replacement
    prev: bytes  # write id of the version this one replaced (zeros for seq 1)
    write_id: bytes  # blake2b-256 of this header: names this very write
    salt: bytes

    @property
    def blocks(self) -> int:
        return -(-self.padded // BLOCK)

    @property
    def stored(self) -> int:
        return stored_size(self.padded)

    def block_span(self, first: int, last: int) -> tuple[int, int]:
        """(stored offset, stored length) of blocks first..last."""
        start = HEAD + first * (BLOCK + TAG)
        end = HEAD + min(self.padded, (last + 1) * BLOCK) + (last + 1) * TAG
        return start, end - start


_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45: no per-block allocations


def seal(key: MirrorKey, name: str, data, seq: int = 1, prev: bytes = ZERO_ID) -> tuple[bytearray, Meta]:
    """The stored bytes of ``data`` as object ``name`` (version ``seq``)."""
    src = memoryview(data).cast("B")
    n = len(src)
    padded = padded_size(n)
    salt = os.urandom(SALT_LEN)
    aead = key.object_cipher(salt)
    aad = _aad(name, salt)
    head = MAGIC + salt + aead.encrypt(_META_NONCE, _META.pack(n, padded, seq, prev), aad)
    out = bytearray(stored_size(padded))
    out[:HEAD] = head
    view = memoryview(out)
    nb = -(-padded // BLOCK)
    pos = HEAD
    for i in range(nb):
        start = i * BLOCK
        plen = min(BLOCK, padded - start)
        block = src[start:start + plen] if start + plen <= n else bytes(src[start:n]).ljust(plen, b"\0")
        if _INTO:
            aead.encrypt_into(_nonce(i, i == nb - 1), block, aad, view[pos:pos + plen + TAG])
        else:
            view[pos:pos + plen + TAG] = aead.encrypt(_nonce(i, i == nb - 1), block, aad)
        pos += plen + TAG
    meta = Meta(n, padded, seq, prev, hashlib.blake2b(head, digest_size=32).digest(), salt)
    return out, meta


def open_meta(key: MirrorKey, name: str, head: bytes, url: str) -> Meta:
    """The header of stored object ``name`` from its first HEAD bytes."""
    if len(head) < HEAD:
        raise ObjectTampered(f"mirror {url}: {name} is truncated ({len(head)} bytes)")
    if head[:len(MAGIC)] != MAGIC:
        raise ObjectTampered(f"mirror {url}: {name} is not an encrypted deltafs object (bad magic)")
    salt = bytes(head[len(MAGIC):len(MAGIC) + SALT_LEN])
    try:
        plain = key.object_cipher(salt).decrypt(_META_NONCE, head[len(MAGIC) + SALT_LEN:HEAD], _aad(name, salt))
    except InvalidTag:
        raise ObjectTampered(f"mirror {url}: {name} fails authentication (altered, swapped with another "
                             "object, or sealed with another key)") from None
    n, padded, seq, prev = _META.unpack(plain)
    if n > padded or seq < 1:
        raise ObjectTampered(f"mirror {url}: {name} has an impossible header")
    return Meta(n, padded, seq, prev, hashlib.blake2b(bytes(head[:HEAD]), digest_size=32).digest(), salt)


def open_blocks(key: MirrorKey, name: str, meta: Meta, first: int, stored, url: str) -> bytearray:
    """Plaintext of blocks first.. (padding included) from their stored bytes."""
    aead = key.object_cipher(meta.salt)
    aad = _aad(name, meta.salt)
    stored = memoryview(stored)
    spans = []
    pos, i = 0, first
    while pos < len(stored):
        plen = min(BLOCK, meta.padded - i * BLOCK)
        if plen <= 0:
            raise ObjectTampered(f"mirror {url}: {name} is longer than its header says")
        if len(stored) - pos < plen + TAG:
            raise ObjectTampered(f"mirror {url}: {name} is truncated")
        spans.append((i, pos, plen))
        pos += plen + TAG
        i += 1
    out = bytearray(sum(p for _, _, p in spans))
    view = memoryview(out)
    at = 0
    for i, pos, plen in spans:
        ct = stored[pos:pos + plen + TAG]
        try:
            if _INTO:
                aead.decrypt_into(_nonce(i, i == meta.blocks - 1), ct, aad, view[at:at + plen])
            else:
                view[at:at + plen] = aead.decrypt(_nonce(i, i == meta.blocks - 1), ct, aad)
        except InvalidTag:
            raise ObjectTampered(f"mirror {url}: {name} fails authentication at block {i} (altered, swapped, "
                                 "or sealed with another key)") from None
        at += plen
    return out


def open_object(key: MirrorKey, name: str, stored: bytes, url: str) -> tuple[Meta, bytes]:
    """(header, plaintext) of a whole stored object."""
    meta = open_meta(key, name, stored[:HEAD], url)
    if len(stored) != meta.stored:
        what = "truncated" if len(stored) < meta.stored else "longer than its header says"
        raise ObjectTampered(f"mirror {url}: {name} is {what} ({len(stored)} bytes, expected {meta.stored})")
    plain = open_blocks(key, name, meta, 0, memoryview(stored)[HEAD:], url)
    del plain[meta.length:]  # the padding
    return meta, bytes(plain)


# --- passphrase KDF --------------------------------------------------------------

KDF_ENV = "DELTAFS_KDF_PARAMS"  # "TIME,MEMORY_KIB,PARALLELISM": skips calibration (tests)
CALIBRATE_TARGET = 0.75  # seconds
CALIBRATE_MEMORY_KIB = 64 << 10
CALIBRATE_PARALLELISM = 2
_KDF_LIMITS = {"time_cost": (1, 1000), "memory_kib": (8, 4 << 20), "parallelism": (1, 64)}


@dataclass(frozen=True)
class KdfParams:
    time_cost: int
    memory_kib: int
    parallelism: int
    salt: bytes

    def to_dict(self) -> dict:
        return {"name": "argon2id", "time_cost": self.time_cost, "memory_kib": self.memory_kib,
                "parallelism": self.parallelism, "salt": base64.b64encode(self.salt).decode()}

    @classmethod
    def from_dict(cls, d: dict) -> KdfParams:
        if d.get("name") != "argon2id":
            raise ValueError(f"unknown KDF {d.get('name')!r}")
        vals = {}
        for k, (lo, hi) in _KDF_LIMITS.items():
            v = d[k]
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"KDF {k} {v!r} out of range")
            vals[k] = v
        salt = base64.b64decode(d["salt"], validate=True)
        if len(salt) < 16:
            raise ValueError("KDF salt too short")
        return cls(salt=salt, **vals)


def _argon2(passphrase: bytes, p: KdfParams) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(passphrase, p.salt, time_cost=p.time_cost, memory_cost=p.memory_kib,
                           parallelism=p.parallelism, hash_len=KEY_LEN, type=Type.ID)


def calibrate(target: float = CALIBRATE_TARGET) -> KdfParams:
    """Argon2id parameters that take about ``target`` seconds here (64 MiB,
    2 lanes, the time cost scaled from the faster of two measured passes);
    $DELTAFS_KDF_PARAMS replaces the measurement (tests)."""
    salt = os.urandom(16)
    env = os.environ.get(KDF_ENV)
    if env:
        try:
            t, m, p = (int(x) for x in env.split(","))
            return KdfParams.from_dict({"name": "argon2id", "time_cost": t, "memory_kib": m, "parallelism": p,
                                        "salt": base64.b64encode(salt).decode()})
        except (ValueError, KeyError) as e:
            raise MirrorKeyError(f"${KDF_ENV} must be TIME,MEMORY_KIB,PARALLELISM: {e}") from None
    probe = KdfParams(1, CALIBRATE_MEMORY_KIB, CALIBRATE_PARALLELISM, salt)
    one = 1.0
    for _ in range(2):  # the faster of two passes: a busy moment must not halve the cost
        t0 = time.perf_counter()
        _argon2(b"calibration", probe)
        one = min(one, max(time.perf_counter() - t0, 1e-3))
    return KdfParams(max(2, min(100, math.ceil(target / one))), CALIBRATE_MEMORY_KIB, CALIBRATE_PARALLELISM, salt)


# --- the key blob ------------------------------------------------------------------


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class KeyBlob:
    """``deltafs-key.json``: the one plaintext object of an encrypted mirror."""

    mirror_id: bytes
    key_id: str
    kdf: KdfParams | None  # None: no passphrase slot (key file only)
    nonce: bytes = b""
    wrapped: bytes = b""
    created_ns: int = 0

    def _bound(self) -> dict:
        """The fields the wrapping authenticates."""
        return {"format": BLOB_FORMAT, "mirror_id": self.mirror_id.hex(), "key_id": self.key_id,
                "cipher": CIPHER, "kdf": self.kdf.to_dict() if self.kdf else None}

    @classmethod
    def create(cls, key: MirrorKey, passphrase: bytes | None, kdf: KdfParams | None) -> KeyBlob:
        blob = cls(key.mirror_id, key.key_id, kdf if passphrase is not None else None, created_ns=time.time_ns())
        if passphrase is not None:
            blob.nonce = os.urandom(12)
            blob.wrapped = AESGCM(_argon2(passphrase, kdf)).encrypt(blob.nonce, key.data_key, _canonical(blob._bound()))
        return blob

    def encode(self) -> bytes:
        d = {**self._bound(), "created_ns": self.created_ns,
             "wrapped_key": ({"nonce": base64.b64encode(self.nonce).decode(),
                              "ciphertext": base64.b64encode(self.wrapped).decode()} if self.kdf else None)}
        d["check"] = hashlib.blake2b(_canonical(d), digest_size=16).hexdigest()
        return json.dumps(d, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, url: str) -> KeyBlob:
        try:
            d = json.loads(data)
            check = d.pop("check")
            if hashlib.blake2b(_canonical(d), digest_size=16).hexdigest() != check:
                raise ValueError("its checksum does not match")
            if d["format"] != BLOB_FORMAT:
                raise MirrorError(f"mirror {url} has an encryption key blob of format {d['format']}; this "
                                  f"deltafs reads format {BLOB_FORMAT}")
            if d["cipher"] != CIPHER:
                raise ValueError(f"unknown cipher {d['cipher']!r}")
            mirror_id = bytes.fromhex(d["mirror_id"])
            key_id = d["key_id"]
            if len(mirror_id) != MIRROR_ID_LEN or not re.fullmatch(r"[0-9a-f]{16}", key_id):
                raise ValueError("bad mirror id or key id")
            kdf = KdfParams.from_dict(d["kdf"]) if d["kdf"] is not None else None
            blob = cls(mirror_id, key_id, kdf, created_ns=int(d.get("created_ns", 0)))
            if kdf is not None:
                w = d["wrapped_key"]
                blob.nonce = base64.b64decode(w["nonce"], validate=True)
                blob.wrapped = base64.b64decode(w["ciphertext"], validate=True)
                if len(blob.nonce) != 12 or len(blob.wrapped) != KEY_LEN + TAG:
                    raise ValueError("bad wrapped key length")
            return blob
        except MirrorError:
            raise
        except Exception as e:  # noqa: BLE001 - any garbage is the same problem
            raise KeyBlobCorrupt(f"mirror {url}: its key blob {KEY_BLOB} is corrupted ({_short(e)}); restore it "
                                 "with `deltafs mirror key import` from a key backup") from None

    def unwrap(self, passphrase: bytes, url: str) -> MirrorKey:
        if self.kdf is None:
            raise MirrorKeyError(f"mirror {url} has no passphrase (it is opened with its key file): "
                                 "give --key-file FILE")
        try:
            data_key = AESGCM(_argon2(passphrase, self.kdf)).decrypt(self.nonce, self.wrapped,
                                                                      _canonical(self._bound()))
        except InvalidTag:
            raise MirrorKeyError(f"wrong passphrase for encrypted mirror {url}") from None
        key = MirrorKey(data_key, self.mirror_id)
        if key.key_id != self.key_id:
            raise KeyBlobCorrupt(f"mirror {url}: its key blob {KEY_BLOB} is corrupted (the key does not "
                                 "match its key id)")
        return key

    def check_key(self, key: MirrorKey, url: str, whose: str) -> None:
        """MirrorKeyError unless ``key`` is this mirror's key."""
        if key.mirror_id != self.mirror_id or key.key_id != self.key_id:
            raise MirrorKeyError(f"mirror {url} is encrypted with another key (key id {self.key_id}, mirror id "
                                 f"{self.mirror_id.hex()}) than {whose} (key id {key.key_id}, mirror id "
                                 f"{key.mirror_id.hex()})")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:120]


# --- key files (export / import) ----------------------------------------------------

KEY_FILE_HEADER = "deltafs mirror key v1"


def export_key(key: MirrorKey, url: str) -> str:
    """A key backup fit for a file or for paper: the data key in base32 groups."""
    k = base64.b32encode(key.data_key).decode().rstrip("=").lower()
    groups = " ".join(k[i:i + 4] for i in range(0, len(k), 4))
    return (f"{KEY_FILE_HEADER}\n"
            f"# the data key of the encrypted deltafs mirror {url}: anyone holding it reads the mirror\n"
            f"mirror-id: {key.mirror_id.hex()}\n"
            f"key-id: {key.key_id}\n"
            f"key: {groups}\n")


def parse_key_file(text: str, where: str) -> MirrorKey:
    fields: dict[str, str] = {}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines or lines[0].lower() != KEY_FILE_HEADER:
        raise MirrorKeyError(f"{where} is not a deltafs mirror key file (it must start with {KEY_FILE_HEADER!r})")
    for ln in lines[1:]:
        k, sep, v = ln.partition(":")
        if sep:
            fields[k.strip().lower()] = v.strip()
    try:
        raw = "".join(fields["key"].split()).upper()
        data_key = base64.b32decode(raw + "=" * (-len(raw) % 8))
        key = MirrorKey(data_key, bytes.fromhex(fields["mirror-id"]))
    except (KeyError, ValueError) as e:
        raise MirrorKeyError(f"{where} is a damaged deltafs mirror key file ({_short(e)})") from None
    if key.key_id != fields.get("key-id", "").lower():
        raise MirrorKeyError(f"{where} is a damaged deltafs mirror key file: its key does not match its key-id "
                             "(a typo?)")
    return key
