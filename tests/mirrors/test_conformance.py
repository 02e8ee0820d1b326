"""One conformance suite every mirror backend passes (file://, s3://).

Modelled on restic's backend test suite: the same tests, parametrised over
backends; backend-specific tests (atomic temp files, S3 error mapping) are
at the end.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from s3server import (
    BUCKET,
    READONLY_ACCESS_KEY,
    READONLY_SECRET_KEY,
    SECRET_KEY,
    S3Server,
    closed_port,
)

from deltafs.errors import MirrorError, UsageError
from deltafs.mirrors import (
    Mirror,
    MirrorAccessDenied,
    MirrorNameError,
    MirrorNotFound,
    MirrorObjectMissing,
    MirrorUnreachable,
    MirrorURLError,
    open_mirror,
)
from deltafs.mirrors.base import TEMP_PREFIX
from deltafs.mirrors.crypto import MirrorKey, padded_size, stored_size
from deltafs.mirrors.encrypted import EncryptedMirror
from deltafs.mirrors.file import FileMirror
from deltafs.mirrors.s3 import S3Mirror

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


def assert_one_line(exc: BaseException, *, secrets: tuple[str, ...] = (SECRET_KEY, READONLY_SECRET_KEY)) -> str:
    """The error is a MirrorError whose message is one clean line."""
    assert isinstance(exc, MirrorError), f"{type(exc).__name__} is not a MirrorError: {exc}"
    msg = str(exc)
    assert msg, "empty message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
    assert "Traceback" not in msg and "File \"" not in msg, msg
    assert len(msg) < 400, f"message too long ({len(msg)}): {msg}"
    for secret in secrets:
        assert secret not in msg, f"secret leaked into: {msg}"
    return msg


@pytest.fixture(params=["file", "s3", "file-encrypted", "s3-encrypted"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def mirror(backend: str, request: pytest.FixtureRequest, tmp_path) -> Mirror:
    """Each backend plain, and wrapped by EncryptedMirror (the same contract on sealed objects)."""
    if backend.startswith("file"):
        m = open_mirror(f"file://{tmp_path}/mirror")
    else:
        server: S3Server = request.getfixturevalue("s3_env")
        m = open_mirror(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}", endpoint_url=server.endpoint_url)
    if backend.endswith("-encrypted"):
        m = EncryptedMirror(m, MirrorKey.generate())
    try:
        yield m
    finally:
        m.close()


# -- round trips ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 5 * MiB], ids=["empty", "1byte", "5MiB"])
def test_put_get_round_trip(mirror: Mirror, size: int) -> None:
    data = os.urandom(size)
    mirror.put("packs/abc.pack", data)
    assert mirror.get("packs/abc.pack") == data
    assert mirror.exists("packs/abc.pack")
    assert list(mirror.list("packs/")) == [("packs/abc.pack", size)]


def test_put_accepts_bytes_like(mirror: Mirror) -> None:
    mirror.put("a", bytearray(b"xyz"))
    mirror.put("b", memoryview(b"0123")[1:3])
    assert mirror.get("a") == b"xyz"
    assert mirror.get("b") == b"12"


def test_overwrite_replaces_whole_object(mirror: Mirror) -> None:
    mirror.put("manifest.json", b"a much longer first version")
    mirror.put("manifest.json", b"short")
    assert mirror.get("manifest.json") == b"short"
    assert list(mirror.list()) == [("manifest.json", 5)]


def test_put_if_absent(mirror: Mirror) -> None:
    assert mirror.put_if_absent("segments/1-2.seg", b"first") is True
    assert mirror.put_if_absent("segments/1-2.seg", b"second") is False
    assert mirror.get("segments/1-2.seg") == b"first"
    assert list(mirror.list()) == [("segments/1-2.seg", 5)]


def test_put_if_absent_race_has_one_winner(mirror: Mirror) -> None:
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait()
        return mirror.put_if_absent("segments/race.seg", f"writer {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count(True) == 1, results
    winner = results.index(True)
    assert mirror.get("segments/race.seg") == f"writer {winner}".encode()


def test_get_missing_object(mirror: Mirror) -> None:
    with pytest.raises(MirrorObjectMissing) as info:
        mirror.get("packs/nope.pack")
    msg = assert_one_line(info.value)
    assert "packs/nope.pack" in msg
    assert not mirror.exists("packs/nope.pack")
    with pytest.raises(MirrorObjectMissing):
        mirror.get_range("packs/nope.pack", 0, 10)


def test_missing_object_is_not_a_directory_prefix(mirror: Mirror) -> None:
    mirror.put("segments/a.seg", b"x")
    assert not mirror.exists("segments")
    with pytest.raises(MirrorObjectMissing):
        mirror.get("segments")


# -- list -------------------------------------------------------------------


def test_list_with_prefix(mirror: Mirror) -> None:
    objects = {
        "manifest.json": b"{}",
        "packs/00aa.pack": b"p1",
        "packs/ffbb.pack": b"p22",
        "segments/0000000000000001-0000000000000100.seg": b"s" * 10,
        "segments/0000000000000101-0000000000000200.seg": b"s" * 20,
        "snapshots/daily": b"",
    }
    for name, data in objects.items():
        mirror.put(name, data)
    everything = sorted((n, len(d)) for n, d in objects.items())
    assert list(mirror.list()) == everything
    assert list(mirror.list("")) == everything
    assert list(mirror.list("segments/")) == [(n, s) for n, s in everything if n.startswith("segments/")]
    assert list(mirror.list("packs/ff")) == [("packs/ffbb.pack", 3)]
    assert list(mirror.list("pack")) == [("packs/00aa.pack", 2), ("packs/ffbb.pack", 3)]
    assert list(mirror.list("segments/0000000000000101")) == [("segments/0000000000000101-0000000000000200.seg", 20)]
    assert list(mirror.list("nothing/")) == []
    assert list(mirror.list("manifest.json")) == [("manifest.json", 2)]


def test_list_empty_mirror(mirror: Mirror) -> None:
    assert list(mirror.list()) == []


def test_list_paginates(mirror: Mirror) -> None:
    mirror.list_page_size = 7
    names = [f"packs/{i:04x}.pack" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: mirror.put(n, n.encode()), names))
    mirror.put("segments/x.seg", b"")
    assert list(mirror.list("packs/")) == [(n, len(n)) for n in names]
    assert len(list(mirror.list())) == 41


@pytest.mark.timeout(120)
def test_list_more_than_1000_objects_s3(s3_env: S3Server) -> None:
    """Real server-side pagination at S3's default page size."""
    m = open_mirror(f"s3://{BUCKET}/big-{uuid.uuid4().hex[:8]}", endpoint_url=s3_env.endpoint_url)
    names = [f"packs/{i:05d}.pack" for i in range(1003)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: m.put(n, b"x"), names))
    assert [n for n, _ in m.list("packs/")] == names
    m.close()


# -- ranges, delete ---------------------------------------------------------


def test_get_range(mirror: Mirror) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    mirror.put("packs/r.pack", data)
    assert mirror.get_range("packs/r.pack", 0, 10) == data[:10]
    assert mirror.get_range("packs/r.pack", 1000, 3000) == data[1000:4000]
    assert mirror.get_range("packs/r.pack", 10000, 1000) == data[10000:]  # short at the end
    assert mirror.get_range("packs/r.pack", 10239, 1) == data[-1:]
    assert mirror.get_range("packs/r.pack", 10240, 5) == b""  # at the end
    assert mirror.get_range("packs/r.pack", 99999, 5) == b""  # past the end
    assert mirror.get_range("packs/r.pack", 5, 0) == b""
    with pytest.raises(ValueError):
        mirror.get_range("packs/r.pack", -1, 5)


def test_get_range_empty_object(mirror: Mirror) -> None:
    mirror.put("empty", b"")
    assert mirror.get_range("empty", 0, 10) == b""


def test_delete(mirror: Mirror) -> None:
    mirror.put("packs/a.pack", b"a")
    mirror.put("packs/b.pack", b"b")
    mirror.delete("packs/a.pack")
    assert not mirror.exists("packs/a.pack")
    assert list(mirror.list()) == [("packs/b.pack", 1)]
    with pytest.raises(MirrorObjectMissing):
        mirror.get("packs/a.pack")
    mirror.delete("packs/a.pack")  # deleting a missing object is fine
    mirror.delete("never/existed")


# -- names ------------------------------------------------------------------

BAD_NAMES = ["", "/abs", "a/../b", "..", "../escape", "a//b", "a/", "./a", "a/.", "nul\x00byte", "new\nline", TEMP_PREFIX + "x", "d/" + TEMP_PREFIX + "x", "x" * 256, ("d/" * 600) + "x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(mirror: Mirror, name: str) -> None:
    for call in (
        lambda: mirror.put(name, b"x"),
        lambda: mirror.put_if_absent(name, b"x"),
        lambda: mirror.get(name),
        lambda: mirror.get_range(name, 0, 1),
        lambda: mirror.exists(name),
        lambda: mirror.delete(name),
    ):
        with pytest.raises(MirrorNameError) as info:
            call()
        assert_one_line(info.value)
    assert list(mirror.list()) == []


@pytest.mark.parametrize("prefix", ["/abs", "../x", "a/../", "a//"])
def test_bad_list_prefix_refused(mirror: Mirror, prefix: str) -> None:
    with pytest.raises(MirrorNameError):
        list(mirror.list(prefix))


def test_good_names_accepted(mirror: Mirror) -> None:
    for name in ["a", "a.b", ".hidden", "..dots", "x/y/z", "ünïcode/名前", "a b", "x" * 255]:
        mirror.put(name, name.encode())
        assert mirror.get(name) == name.encode()


# -- atomicity ----------------------------------------------------------------


def test_readers_never_see_partial_objects(mirror: Mirror) -> None:
    """Readers and listers racing overwrites see one whole version, and
    never a temp name."""
    versions = [bytes([v]) * (2 * MiB) for v in (1, 2)]
    mirror.put("packs/hot.pack", versions[0])
    stop = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            mirror.put("packs/hot.pack", versions[i % 2])
            i += 1

    def reader() -> None:
        while not stop.is_set():
            data = mirror.get("packs/hot.pack")
            if data not in versions:
                problems.append(f"partial read of {len(data)} bytes")
            listed = list(mirror.list())
            if listed != [("packs/hot.pack", 2 * MiB)]:
                problems.append(f"listed {listed}")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    try:
        threading.Event().wait(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert problems == []


def test_file_temp_files_invisible_and_cleaned(tmp_path) -> None:
    m = open_mirror(f"file://{tmp_path}/mirror")
    m.put("packs/real.pack", b"real")
    stray = tmp_path / "mirror" / "packs" / (TEMP_PREFIX + "deadbeef")
    stray.write_bytes(b"half a crash")
    assert list(m.list()) == [("packs/real.pack", 4)]
    os.utime(stray, (0, 0))
    assert isinstance(m, FileMirror)
    assert m.clean_temp() == 1
    assert not stray.exists()
    assert sorted(os.listdir(tmp_path / "mirror" / "packs")) == ["real.pack"]


def test_file_put_leaves_no_temp_on_success(tmp_path) -> None:
    m = open_mirror(f"file://{tmp_path}/m")
    m.put("a/b.seg", b"1")
    m.put("a/b.seg", b"2")
    assert m.put_if_absent("a/b.seg", b"3") is False
    assert m.put_if_absent("a/c.seg", b"3") is True
    assert sorted(os.listdir(tmp_path / "m" / "a")) == ["b.seg", "c.seg"]


def test_file_put_if_absent_fallbacks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hard links (vfat), renameat2(RENAME_NOREPLACE) is used; without
    that too, check-then-rename."""
    import errno

    from deltafs.mirrors import file as file_mod

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(file_mod.os, "link", no_link)
    m = FileMirror(tmp_path / "m1")
    assert m.put_if_absent("x", b"1") is True
    assert m.put_if_absent("x", b"2") is False
    assert m._put_if_absent_mode == "renameat2"
    assert m.get("x") == b"1"

    def no_renameat2(src, dst):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(file_mod, "_renameat2_noreplace", no_renameat2)
    m = FileMirror(tmp_path / "m2")
    assert m.put_if_absent("x", b"1") is True
    assert m.put_if_absent("x", b"2") is False
    assert m._put_if_absent_mode == "check-then-rename"
    assert m.get("x") == b"1"
    assert os.listdir(tmp_path / "m2") == ["x"]


@pytest.mark.parametrize("backend", ["file-encrypted", "s3-encrypted"], indirect=True)
def test_encrypted_storage_sees_keyed_names_and_bucket_sizes(mirror: Mirror) -> None:
    """What the storage below an encrypted mirror holds: no plaintext name,
    sizes that depend only on the padding bucket, the same stored name for
    the same object (idempotent retries)."""
    objects = {"manifest.json": b"{}", "packs/" + "ab" * 32 + ".pack": os.urandom(3 * MiB + 5),
               "segments/0000000000000001-0000000000000002.seg": b"s" * 700}
    for name, data in objects.items():
        mirror.put(name, data)
    stored = dict(mirror.backend.list())
    assert len(stored) == len(objects)
    for name, data in objects.items():
        sname = mirror.key.encode_name(name)
        assert sname in stored and sname == mirror.key.encode_name(name)
        assert not any(part in sname for part in name.replace(".", "/").split("/") if len(part) > 3)
        assert stored[sname] == stored_size(padded_size(len(data)))
    assert padded_size(3 * MiB + 5) == 3 * MiB + 65536 and padded_size(700) == 704 and padded_size(0) == 512
    mirror.put("segments/0000000000000001-0000000000000002.seg", b"t" * 703)  # same bucket
    assert dict(mirror.backend.list()) == stored


# -- check() and URLs ---------------------------------------------------------


def test_check_ok(mirror: Mirror) -> None:
    mirror.check()


def test_url_has_no_secrets(mirror: Mirror, backend: str) -> None:
    assert mirror.url.startswith(f"{backend.split('-')[0]}://")
    assert SECRET_KEY not in mirror.url and SECRET_KEY not in repr(mirror)


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "http://example.com/m", "nothing", "", "s3://", "s3:///prefix", "file://host/x", "file:relative", "s3://key:secret@bucket/p", "file:///x?y=1", "s3://b/a/../c"],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(MirrorURLError) as info:
        open_mirror(url)
    msg = assert_one_line(info.value, secrets=("secret",) if "secret@" in url else ())
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_unknown_scheme_message() -> None:
    with pytest.raises(MirrorError, match=r"unknown mirror URL scheme 'ftp'.*file://, s3://"):
        open_mirror("ftp://host/x")


# -- file errors ----------------------------------------------------------------


def test_file_parent_must_exist(tmp_path) -> None:
    with pytest.raises(MirrorNotFound) as info:
        open_mirror(f"file://{tmp_path}/missing/mirror")
    msg = assert_one_line(info.value)
    assert "parent" in msg and str(tmp_path / "missing") in msg


def test_file_directory_created_if_parent_exists(tmp_path) -> None:
    m = open_mirror(f"file://{tmp_path}/new")
    assert (tmp_path / "new").is_dir()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    m.check()


def test_file_path_is_a_file(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(MirrorError) as info:
        open_mirror(f"file://{tmp_path}/f")
    assert "not a directory" in assert_one_line(info.value)


def test_file_check_root_vanished(tmp_path) -> None:
    m = open_mirror(f"file://{tmp_path}/gone")
    os.rmdir(tmp_path / "gone")
    with pytest.raises(MirrorNotFound) as info:
        m.check()
    assert_one_line(info.value)
    with pytest.raises(MirrorNotFound):
        m.put("a/b", b"x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_file_check_not_writable(tmp_path) -> None:
    m = open_mirror(f"file://{tmp_path}/ro")
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(MirrorAccessDenied) as info:
            m.check()
        assert "not writable" in assert_one_line(info.value)
        with pytest.raises(MirrorAccessDenied):
            m.put("x", b"x")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


# -- S3 errors ------------------------------------------------------------------


def _s3(server: S3Server, url: str | None = None) -> S3Mirror:
    m = open_mirror(url or f"s3://{BUCKET}/errors", endpoint_url=server.endpoint_url)
    assert isinstance(m, S3Mirror)
    return m


def test_s3_wrong_access_key(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    m = _s3(s3_env)
    for call in (m.check, lambda: m.put("x", b"x"), lambda: m.get("x"), lambda: list(m.list())):
        with pytest.raises(MirrorAccessDenied) as info:
            call()
        msg = assert_one_line(info.value)
        assert "InvalidAccessKeyId" in msg and s3_env.endpoint_url in msg


def test_s3_wrong_secret(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    m = _s3(s3_env)
    with pytest.raises(MirrorAccessDenied) as info:
        m.check()
    msg = assert_one_line(info.value, secrets=("wrong-secret", SECRET_KEY))
    assert "SignatureDoesNotMatch" in msg
    with pytest.raises(MirrorAccessDenied):  # HEAD: a bare 403, no error code
        m.exists("x")


def test_s3_read_only_credentials(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _s3(s3_env)
    writer.put("ro/x", b"x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READONLY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READONLY_SECRET_KEY)
    reader = _s3(s3_env)
    reader.check()
    assert reader.get("ro/x") == b"x"
    with pytest.raises(MirrorAccessDenied) as info:
        reader.put("ro/y", b"y")
    msg = assert_one_line(info.value)
    assert "denied" in msg and "put ro/y" in msg


def test_s3_missing_bucket(s3_env: S3Server) -> None:
    m = _s3(s3_env, "s3://no-such-bucket-here/p")
    for call in (m.check, lambda: m.put("x", b"x"), lambda: m.get("x"), lambda: list(m.list())):
        with pytest.raises(MirrorNotFound) as info:
            call()
        msg = assert_one_line(info.value)
        assert "'no-such-bucket-here' does not exist" in msg and "NoSuchBucket" in msg


def test_s3_unreachable_endpoint(s3_env: S3Server) -> None:
    port = closed_port()
    m = open_mirror(f"s3://{BUCKET}/p", endpoint_url=f"http://127.0.0.1:{port}")
    for call in (m.check, lambda: m.put("x", b"x"), lambda: m.get("x"), lambda: m.exists("x")):
        with pytest.raises(MirrorUnreachable) as info:
            call()
        assert assert_one_line(info.value) == f"cannot reach S3 endpoint http://127.0.0.1:{port}: connection refused"


def test_s3_no_credentials(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    m = _s3(s3_env)
    with pytest.raises(MirrorAccessDenied) as info:
        m.check()
    assert "no S3 credentials found" in assert_one_line(info.value)


def test_s3_endpoint_from_environment(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    m = open_mirror(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:8]}")
    m.check()
    m.put("a", b"b")
    assert m.get("a") == b"b"
    assert m.endpoint_url == s3_env.endpoint_url


def test_s3_bad_endpoint_url(s3_env: S3Server) -> None:
    with pytest.raises(MirrorError) as info:
        open_mirror(f"s3://{BUCKET}/p", endpoint_url="not a url")
    assert_one_line(info.value)


def test_s3_prefixes_isolate(s3_env: S3Server) -> None:
    a = _s3(s3_env, f"s3://{BUCKET}/iso-{uuid.uuid4().hex[:8]}/a")
    b = _s3(s3_env, a.url + "b")  # ".../ab": a string prefix of a's would leak
    a.put("x", b"1")
    b.put("x", b"2")
    assert list(a.list()) == [("x", 1)]
    assert list(b.list()) == [("x", 1)]
    assert a.get("x") == b"1" and b.get("x") == b"2"


def test_s3_head_then_put_fallback(s3_env: S3Server) -> None:
    m = open_mirror(f"s3://{BUCKET}/hp-{uuid.uuid4().hex[:8]}", endpoint_url=s3_env.endpoint_url)
    m.conditional_writes = False
    assert m.put_if_absent("x", b"1") is True
    assert m.put_if_absent("x", b"2") is False
    assert m.get("x") == b"1"


def test_s3_corrupted_upload_rejected(s3_env: S3Server) -> None:
    """The server checks our Content-MD5: a body changed in transit is refused."""
    m = _s3(s3_env, f"s3://{BUCKET}/md5-{uuid.uuid4().hex[:8]}")

    def corrupt(request, **kwargs) -> None:
        request.body = b"Original"  # same length: only the MD5 can tell

    m._client.meta.events.register("before-send.s3.PutObject", corrupt)
    with pytest.raises(MirrorError) as info:
        m.put("x", b"original")  # noqa
    assert "BadDigest" in assert_one_line(info.value)
    assert not m.exists("x")


@pytest.mark.timeout(120)
def test_s3_outage_and_recovery(s3_outage: S3Server) -> None:
    m = _s3(s3_outage, f"s3://{BUCKET}/outage-{uuid.uuid4().hex[:8]}")
    m.put("before", b"kept")
    s3_outage.stop()
    with pytest.raises(MirrorUnreachable) as info:
        m.put("during", b"x")
    assert "connection refused" in assert_one_line(info.value)
    s3_outage.start()
    assert m.get("before") == b"kept"
    m.put("after", b"ok")
    assert [n for n, _ in m.list()] == ["after", "before"]


# -- the fixture itself ---------------------------------------------------------


def test_missing_weed_skips_or_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3server

    monkeypatch.setattr(s3server, "find_weed", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="weed` binary not found"):
        s3server.require_weed()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        s3server.require_weed()


def test_s3_silent_endpoint_times_out(s3_env: S3Server) -> None:
    """A server that accepts connections but never answers: bounded wait."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        m = S3Mirror(BUCKET, "p", endpoint_url=f"http://127.0.0.1:{port}", read_timeout=0.3, max_attempts=1)
        with pytest.raises(MirrorUnreachable) as info:
            m.get("x")
        assert assert_one_line(info.value) == f"cannot reach S3 endpoint http://127.0.0.1:{port}: no answer within 0.3s"
