"""A generated corpus of mixed files for the guard and rollback tests, and a
tree fingerprint to compare trees byte for byte, mode for mode, name for name."""

from __future__ import annotations

import io
import os
import random
import sqlite3
import stat
import struct
import zipfile
import zlib
from pathlib import Path

WORDS = ("alpha beta gamma delta epsilon invoice budget report meeting notes quarterly summary "
         "customer order shipping total amount balance the of and to in for on with").split()


def _text(rng: random.Random, n: int) -> bytes:
    out, size = [], 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def _png(rng: random.Random, w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # smooth-ish rows, like a photo: compressible, but zlib'd inside the PNG
    rows = b"".join(b"\0" + bytes((x * 3 + y + rng.randint(0, 40)) & 0xFF for x in range(w * 3))
                    for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))


def _pdf(rng: random.Random, n: int) -> bytes:
    body = _text(rng, n)
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n2 0 obj << /Length " + b"%d" % len(body) + b" >>\nstream\n"
            + body + b"\nendstream endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def _zip(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", _text(rng, 600))
        z.writestr("word/document.xml", _text(rng, rng.randint(2000, 20000)))
    return buf.getvalue()


def make_corpus(root: Path, n: int = 200, seed: int = 1) -> list[Path]:
    """``n`` files below root in a few directories (text, PDF-like, PNG, office-like
    zip, sqlite), some with other modes, a symlink and an xattr; -> the regular files."""
    rng = random.Random(seed)
    files = []
    for i in range(n):
        d = root / f"dir{i % 7}" / (f"sub{i % 3}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        kind = i % 6
        if kind in (0, 1):
            p, data = d / f"notes{i}.txt", _text(rng, rng.randint(200, 30000))
        elif kind == 2:
            p, data = d / f"report{i}.pdf", _pdf(rng, rng.randint(3000, 40000))
        elif kind == 3:
            p, data = d / f"photo{i}.png", _png(rng, rng.randint(16, 64), rng.randint(16, 64))
        elif kind == 4:
            p, data = d / f"letter{i}.docx", _zip(rng)
        else:
            p = d / f"data{i}.sqlite"
            con = sqlite3.connect(p)
            con.execute("create table t (id integer primary key, v text)")
            con.executemany("insert into t (v) values (?)", [(_text(rng, 80).decode(),) for _ in range(rng.randint(5, 60))])
            con.commit()
            con.close()
            files.append(p)
            continue
        p.write_bytes(data)
        if i % 10 == 7:
            p.chmod(0o600)
        files.append(p)
    (root / "dir0" / "latest").symlink_to("notes0.txt")
    return files


def tag(path: Path, value: bytes = b"keep") -> bool:
    """An xattr on path (through the mount: the mount-time scan does not record xattrs)."""
    try:
        os.setxattr(path, b"user.tag", value)
        return True
    except OSError:
        return False


def fingerprint(root: Path, skip: str = ".deltafs") -> dict:
    """path -> (type, permission bits, content or link target, xattrs) of everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, os.readlink(p), ())
                continue
            try:
                xa = tuple(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p)))
            except OSError:
                xa = ()
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), b"", xa)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), Path(p).read_bytes(), xa)
    return out


def differences(a: dict, b: dict) -> list[str]:
    """Readable differences between two fingerprints ([] = equal)."""
    out = [f"only in first: {p}" for p in sorted(set(a) - set(b))]
    out += [f"only in second: {p}" for p in sorted(set(b) - set(a))]
    for p in sorted(set(a) & set(b)):
        if a[p] != b[p]:
            what = [n for n, x, y in zip(("type", "mode", "content", "xattrs"), a[p], b[p]) if x != y]
            out.append(f"{p}: {', '.join(what)} differ")
    return out
