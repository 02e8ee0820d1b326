"""The bench's row probe (DELTAFS_BENCH_PROBE): off unless asked, per-thread CPU when on."""

import os
import threading
import time
from types import SimpleNamespace

from tools.bench.runner import Probe


def _target(is_mount=True):
    return SimpleNamespace(is_mount=is_mount, pid=os.getpid() if is_mount else None, name="cap")


def test_probe_is_off_unless_the_row_matches(monkeypatch, capsys):
    monkeypatch.delenv("DELTAFS_BENCH_PROBE", raising=False)
    assert not Probe("read 1 GiB cold", _target(), 1).on
    monkeypatch.setenv("DELTAFS_BENCH_PROBE", "read .* cold")
    assert not Probe("read 1 GiB warm", _target(), 1).on
    assert not Probe("read 1 GiB cold", _target(is_mount=False), 1).on
    p = Probe("read 1 GiB warm", _target(), 1)
    p.done()
    assert capsys.readouterr().err == ""


def test_probe_logs_the_cpu_of_each_thread(monkeypatch, capsys):
    monkeypatch.setenv("DELTAFS_BENCH_PROBE", "read .* cold")
    monkeypatch.delenv("DELTAFS_BENCH_PROBE_TOOLS", raising=False)
    p = Probe("read 1 GiB cold", _target(), 2)
    assert p.on
    tid = []
    busy, stop = threading.Event(), threading.Event()

    def burn():  # a daemon thread's work: it stays alive, as the daemon's threads do
        tid.append(threading.get_native_id())
        t0 = time.monotonic()
        x = 0
        while time.thread_time() < 0.15 and time.monotonic() - t0 < 10:
            x += 1
        busy.set()
        stop.wait(10)

    th = threading.Thread(target=burn)
    th.start()
    assert busy.wait(15)
    p.done()
    stop.set()
    th.join()
    err = capsys.readouterr().err
    assert "probe read 1 GiB cold cap round 2: faults minor" in err
    # the busy thread is listed with its CPU time (clock ticks: at least 0.1 s of 0.15)
    entry = err.split(f" {tid[0]} ", 1)[1].split(",")[0]
    assert float(entry.split()[-1].rstrip("s")) >= 0.1


def test_warm_memory_only_for_matching_rows_and_leaves_no_file(monkeypatch, tmp_path):
    from tools.bench.runner import warm_memory
    t = SimpleNamespace(base=str(tmp_path))
    monkeypatch.delenv("DELTAFS_BENCH_WARM", raising=False)
    assert not warm_memory("write 1 GiB bs=1M +fsync", t)
    monkeypatch.setenv("DELTAFS_BENCH_WARM", "^(over)?write")
    monkeypatch.setenv("DELTAFS_BENCH_WARM_MIB", "2")
    assert not warm_memory("read 1 GiB cold", t)
    assert warm_memory("overwrite 1 GiB bs=1M +fsync (captured file)", t)
    assert os.listdir(tmp_path) == []
