"""deltafs/mirrors/crypto.py and the EncryptedMirror wrapper on a file:// directory."""

from __future__ import annotations

import os
import random

import pytest

from deltafs.mirrors import open_mirror
from deltafs.mirrors import crypto as C
from deltafs.mirrors.encrypted import EncryptedMirror, SeenStore
from deltafs.mirrors.keys import Secrets, create, read_blob

MiB = 1 << 20


def test_padding_buckets():
    assert [C.padded_size(n) for n in (0, 1, 512, 513, 4096, 4097, MiB - 1)] == \
        [512, 512, 512, 544, 4096, 4352, MiB]
    assert [C.padded_size(n) for n in (MiB, MiB + 1, 16 * MiB + 7)] == [MiB, MiB + 32768, 16 * MiB + 524288]
    rnd = random.Random(3)
    for n in [rnd.randrange(513, 1 << 34) for _ in range(20000)]:
        p = C.padded_size(n)
        assert n <= p <= n * 1.0625 and C.padded_size(p) == p  # buckets are fixed points
    for n in (700, 70_000, 3 * MiB):  # the stored size depends on the bucket only
        key = C.MirrorKey.generate()
        assert len(C.seal(key, "x", b"a" * n)[0]) == len(C.seal(key, "x", b"b" * C.padded_size(n))[0])


@pytest.mark.parametrize("size", [0, 1, C.BLOCK - 1, C.BLOCK, C.BLOCK + 1, 3 * C.BLOCK + 5, MiB + 3])
def test_seal_open_round_trip(size):
    key = C.MirrorKey.generate()
    data = random.Random(size).randbytes(size)
    stored, meta = C.seal(key, "packs/p.pack", data, seq=3, prev=b"\1" * 32)
    got_meta, plain = C.open_object(key, "packs/p.pack", stored, "u")
    assert plain == data and (got_meta.seq, got_meta.prev, got_meta.write_id) == (3, b"\1" * 32, meta.write_id)
    assert len(stored) == C.stored_size(C.padded_size(size))
    assert C.seal(key, "packs/p.pack", data)[0] != C.seal(key, "packs/p.pack", data)[0]  # fresh salt


def test_any_flipped_byte_or_other_name_or_key_is_refused():
    key = C.MirrorKey.generate()
    stored, _ = C.seal(key, "segments/a.seg", os.urandom(3 * C.BLOCK))
    rnd = random.Random(5)
    for pos in [0, 8, 40, C.HEAD - 1, C.HEAD, len(stored) - 1] + rnd.sample(range(len(stored)), 40):
        bad = bytearray(stored)
        bad[pos] ^= 0x80
        with pytest.raises(C.ObjectTampered):
            C.open_object(key, "segments/a.seg", bytes(bad), "u")
    with pytest.raises(C.ObjectTampered, match="fails authentication"):
        C.open_object(key, "segments/b.seg", stored, "u")  # the name is bound in
    with pytest.raises(C.ObjectTampered, match="fails authentication"):
        C.open_object(C.MirrorKey.generate(), "segments/a.seg", stored, "u")
    with pytest.raises(C.ObjectTampered, match="truncated"):
        C.open_object(key, "segments/a.seg", stored[:-(C.BLOCK + C.TAG)], "u")


def test_names_are_keyed_deterministic_and_reversible():
    k1, k2 = C.MirrorKey.generate(), C.MirrorKey.generate()
    for name in ["manifest.json", "packs/" + "ab" * 32 + ".pack", "x" * 255, "ünïcode/名前"]:
        s = k1.encode_name(name)
        assert s == k1.encode_name(name) and s != k2.encode_name(name)
        assert k1.decode_name(s) == name and k2.decode_name(s) is None
        assert s.startswith(C.NAME_DIR) and all(len(p) <= 255 for p in s.split("/"))
    short = {len(k1.encode_name(n)) for n in ("manifest.json", "segments/" + "0" * 33 + ".seg",
                                               "packs/" + "ab" * 32 + ".pack")}
    assert len(short) == 1  # deltafs's own names all look alike
    with pytest.raises(C.MirrorNameError):
        k1.encode_name("y" * 600)


PASSPHRASE = b"correct horse battery staple"


def test_key_blob_wrap_unwrap_and_damage(monkeypatch):
    monkeypatch.setenv(C.KDF_ENV, "1,64,1")
    key = C.MirrorKey.generate()
    blob = C.KeyBlob.create(key, PASSPHRASE, C.calibrate())
    data = blob.encode()
    assert PASSPHRASE not in data  # (a 2-letter one turned up in the base64 by chance) and key.data_key not in data
    again = C.KeyBlob.decode(data, "u")
    assert again.unwrap(PASSPHRASE, "u").data_key == key.data_key
    with pytest.raises(C.MirrorKeyError, match="wrong passphrase"):
        again.unwrap(b"pW", "u")
    with pytest.raises(C.KeyBlobCorrupt, match="corrupted"):
        C.KeyBlob.decode(data.replace(b'"time_cost": 1', b'"time_cost": 2'), "u")  # checksum
    with pytest.raises(C.KeyBlobCorrupt):
        C.KeyBlob.decode(data[:50], "u")
    with pytest.raises(C.MirrorKeyError, match="another key"):
        again.check_key(C.MirrorKey.generate(), "u", "the key file")


def test_default_parameters_are_calibrated(monkeypatch):
    monkeypatch.delenv(C.KDF_ENV, raising=False)
    p = C.calibrate()
    assert p.memory_kib == 64 << 10 and p.parallelism == 2 and p.time_cost >= 2 and len(p.salt) == 16
    monkeypatch.setenv(C.KDF_ENV, "nonsense")
    with pytest.raises(C.MirrorKeyError):
        C.calibrate()


def test_key_file_round_trip_and_typos():
    key = C.MirrorKey.generate()
    text = C.export_key(key, "file:///m")
    assert C.parse_key_file(text, "f").data_key == key.data_key
    line = next(ln for ln in text.splitlines() if ln.startswith("key: "))
    typo = line[:6] + ("b" if line[6] != "b" else "c") + line[7:]
    with pytest.raises(C.MirrorKeyError, match="does not match its key-id"):
        C.parse_key_file(text.replace(line, typo), "f")
    with pytest.raises(C.MirrorKeyError, match="not a deltafs mirror key file"):
        C.parse_key_file("hello", "f")


def test_ranges_across_blocks_and_in_two_requests(tmp_path):
    m = EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), C.MirrorKey.generate())
    data = random.Random(1).randbytes(3 * MiB + 17)
    m.put("packs/big.pack", data)
    for off, n in [(0, 1), (C.BLOCK - 3, 10), (5, 3 * C.BLOCK), (2 * MiB + 1, 300_000), (len(data) - 20, 100),
                   (len(data), 5), (len(data) + 9, 5)]:
        assert m.get_range("packs/big.pack", off, n) == data[off:off + n]


def test_rollback_and_vanishing_are_caught_by_a_later_reader(tmp_path):
    key = C.MirrorKey.generate()
    seen = [str(tmp_path / "state" / "m.json")]
    w = EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), key, SeenStore(seen))
    w.put("manifest.json", b"v1")
    stored = tmp_path / "m" / key.encode_name("manifest.json")
    old = stored.read_bytes()
    w.put("manifest.json", b"v2")
    w.put("manifest.json", b"v3")
    r = EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), key, SeenStore(seen))  # another process
    assert r.get("manifest.json") == b"v3"
    stored.write_bytes(old)
    with pytest.raises(C.MirrorRollbackError, match="version 1, but this machine has seen version 3"):
        r.get("manifest.json")
    w2 = EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), key, SeenStore(seen))
    with pytest.raises(C.MirrorRollbackError):
        w2.put("manifest.json", b"v4")  # a writer notices too (it reads the version it replaces)
    stored.unlink()
    with pytest.raises(C.MirrorRollbackError, match="is gone"):
        EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), key, SeenStore(seen)).get("manifest.json")
    fresh = EncryptedMirror(open_mirror(f"file://{tmp_path}/m"), key)  # a first reader cannot know
    with pytest.raises(Exception, match="does not exist"):
        fresh.get("manifest.json")


def test_create_refuses_what_is_not_empty(tmp_path, monkeypatch):
    monkeypatch.setenv(C.KDF_ENV, "1,64,1")
    monkeypatch.setenv("DELTAFS_PASSPHRASE", "p")
    plain = open_mirror(f"file://{tmp_path}/plain")
    plain.put("manifest.json", b"{}")
    with pytest.raises(Exception, match="plain"):
        create(plain, Secrets())
    m = open_mirror(f"file://{tmp_path}/enc")
    create(m, Secrets(key_file=str(tmp_path / "k")))  # passphrase too, from the environment
    assert read_blob(m).kdf is not None and (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception):
        create(m, Secrets())
