"""mount --metrics-addr: the Prometheus text of `status --prometheus` over HTTP."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusetools import force_unmount, run_cli

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(addr: str) -> dict:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str) -> float:
    (sample,) = fams[name].samples
    return sample.value


def wait_metric(addr: str, name: str, at_least: float, timeout: float = 15.0) -> dict:
    """The daemon copies its status every second: poll the HTTP endpoint with a deadline."""
    end = time.monotonic() + timeout
    while True:
        fams = scrape(addr)
        if name in fams and value(fams, name) >= at_least:
            return fams
        if time.monotonic() > end:
            raise AssertionError(f"{name} stayed below {at_least}: {fams.get(name)}")
        time.sleep(0.1)


def test_metrics_endpoint_reflects_writes(mount_factory):
    addr = f"127.0.0.1:{free_port()}"
    m = mount_factory(None, "--metrics-addr", addr)
    fams = scrape(addr)  # served from the moment the mount is ready
    assert value(fams, "deltafs_daemon_up") == 1
    (up,) = fams["deltafs_daemon_up"].samples
    assert up.labels["mnt"] == str(m.mnt) and up.labels["src"] == str(m.src)
    for i in range(3):
        (m.mnt / f"f{i}.txt").write_bytes(b"version %d\n" % i * 100)
    run_cli("flush", m.mnt, check=True)
    fams = wait_metric(addr, "deltafs_capture_versions", 3)
    assert value(fams, "deltafs_capture_pending") == 0
    assert value(fams, "deltafs_capture_failures") == 0
    assert value(fams, "deltafs_journal_records") >= 6  # 3 creates + 3 versions
    # the same families as `status --prometheus`
    text = run_cli("status", m.mnt, "--prometheus", check=True).stdout.decode()
    assert {f.name for f in text_string_to_metric_families(text)} == set(fams)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{addr}/nope", timeout=10)
    assert e.value.code == 404
    m.umount()
    with pytest.raises(urllib.error.URLError):  # the server is gone with the daemon
        urllib.request.urlopen(f"http://{addr}/metrics", timeout=10)


def test_detached_daemon_gets_the_option(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    addr = f"127.0.0.1:{free_port()}"
    try:
        run_cli("mount", src, mnt, "--metrics-addr", addr, check=True)
        assert value(scrape(addr), "deltafs_mounted") == 1
    finally:
        run_cli("umount", mnt)
        force_unmount(mnt)


@pytest.mark.parametrize("addr, msg", [
    ("9108", "expected HOST:PORT"),
    (":9108", "expected HOST:PORT"),
    ("127.0.0.1:0", "port must be a number from 1 to 65535"),
    ("127.0.0.1:http", "port must be a number"),
    ("::1:9108", "expected HOST:PORT or [IPV6]:PORT"),
])
def test_bad_address_is_one_line_exit_2(tmp_path, addr, msg):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    res = run_cli("mount", src, mnt, "--metrics-addr", addr)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("deltafs: bad --metrics-addr") and msg in err
    assert not (src / ".deltafs").exists()  # refused before anything was touched


def test_port_in_use_fails_the_mount(tmp_path, mount_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        addr = "127.0.0.1:%d" % busy.getsockname()[1]
        src, mnt = tmp_path / "src", tmp_path / "mnt"
        src.mkdir()
        mnt.mkdir()
        # the command line checks before forking: one line, exit 4 (mount problem)
        res = run_cli("mount", src, mnt, "--metrics-addr", addr)
        err = res.stderr.decode()
        assert res.returncode == 4, err
        assert err == f"deltafs: cannot serve metrics on {addr}: Address already in use\n"
        # the daemon itself (as after a race): the mount fails, nothing stays mounted
        m = mount_factory(None, "--metrics-addr", addr, start=False)
        with pytest.raises(AssertionError, match=f"ERROR 4 cannot serve metrics on {addr}"):
            m.start()
        assert m.proc.wait(timeout=30) == 4
        assert not m.is_mounted()
