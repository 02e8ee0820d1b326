"""tools.bench.capcpu (issue 19): per-thread CPU deltas and the in-process capture it compares with."""

import os
import threading
import time

from tools.bench import capcpu


def test_thread_cpu_sees_a_busy_thread_and_delta_orders_it_first():
    before = capcpu.thread_cpu(os.getpid())
    tid = []
    busy, stop = threading.Event(), threading.Event()

    def burn():  # it stays alive until read: a finished thread leaves /proc/PID/task
        tid.append(threading.get_native_id())
        t0 = time.monotonic()
        while time.thread_time() < 0.12 and time.monotonic() - t0 < 10:
            pass
        busy.set()
        stop.wait(10)
    t = threading.Thread(target=burn)
    t.start()
    busy.wait(10)
    after = capcpu.thread_cpu(os.getpid())
    stop.set()
    t.join()
    rows = capcpu.cpu_delta(before, after)
    assert tid[0] in after
    mine = next(r for r in rows if r[1] == tid[0])
    assert mine[0] >= 0.05 and abs(mine[0] - (mine[2] + mine[3])) < 1e-9
    assert rows == sorted(rows, reverse=True)


def test_inproc_captures_a_fresh_file_and_its_overwrite(tmp_path):
    res = capcpu.inproc(0, str(tmp_path))  # 0: 8 MiB
    assert [r[0] for r in res] == ["fresh", "overwrite"]
    assert all(c >= 0 and k >= 0 for _, c, k in res)
    assert os.listdir(tmp_path) == []  # its journal and file are removed
