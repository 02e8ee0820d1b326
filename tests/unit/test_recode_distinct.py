"""tools/bench/recode_distinct.py's greedy assignment (issue 20 study): a
chain of 4-base values goes over today's sum rule long before its closure
does, and neither rule lets a value past its bound."""

from __future__ import annotations

import pytest

from tools.bench.recode_distinct import assign

pytestmark = pytest.mark.unit


def _chain(n: int) -> dict:
    ids = [bytes([i]) * 16 for i in range(n)]
    cands, stored = {}, {}
    for i, c in enumerate(ids):
        stored[c] = (100, ())
        cs = [(100, (), "stored", False), (100, (), "standalone", False)]
        if i >= 4:
            cs.append((10, (ids[i - 4], ids[i - 3], ids[i - 2], ids[i - 1]), "prev version + 3 found", True))
        if i >= 1:
            cs.append((60, (ids[i - 1],), "same offset", True))
        cands[c] = cs
    return {"order": ids, "stored": stored, "cands": cands, "versions": [ids[:k] for k in range(1, n + 1)],
            "unlisted": {}}


def test_distinct_lets_the_chain_through():
    cd = _chain(100)
    today = assign(cd, "stored", 0)
    assert today["share"] == 1.0 and today["max_closure"] == 0
    s = assign(cd, "sum", 128, None)
    assert s["max_sum_depth"] <= 128
    for b in (128, 64, 32):
        d = assign(cd, "distinct", b)
        assert d["max_closure"] <= b
        assert d["bytes"] < s["bytes"]
    d = assign(cd, "distinct", 128)
    assert d["max_closure"] == 99  # every chunk built on all before it
    assert d["max_sum_depth"] > 10 ** 6
    assert d["cold_read"]["memo_per_version"] == sum(range(1, 101))  # each version: its chunks, each once
    assert d["chunk_reads_over_sum_128"] > 0


def test_sum_rule_extras_budget():
    cd = _chain(40)
    a = assign(cd, "sum", 128, 16)
    b = assign(cd, "sum", 128, None)
    assert a["bytes"] >= b["bytes"]
    assert a["max_sum_depth"] <= 128


def test_on_a_journal(tmp_path):
    """candidates() reads a real journal: b.txt (stored standalone, a new file)
    gets a.txt's chunk as a found base, and every rule stores no more than today."""
    from deltafs.journal import Journal
    from test_journal import FakeClock
    from test_recode import _history

    from tools.bench.recode_distinct import candidates

    j = Journal.open(tmp_path / "j", create=True, clock=FakeClock())
    try:
        _history(j)
    finally:
        j.close()
    cd = candidates(str(tmp_path / "j"), "", 9, log=lambda m: None, global_index=True)
    assert len(cd["order"]) == 7 and len(cd["versions"]) == 7
    today = assign(cd, "stored", 0)
    for rule, b, ex in (("sum", 128, 16), ("distinct", 128, None), ("distinct", 32, None)):
        r = assign(cd, rule, b, ex)
        assert r["bytes"] < today["bytes"]
        assert sum(n for k, n in r["picks"].items() if k.startswith("found")) >= 1
