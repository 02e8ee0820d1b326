"""The bench's verdicts: ratios, and a row failing when captures fall behind."""

from tools.bench import report
from tools.bench.runner import Results, Sample


def _results(settle: float) -> Results:
    res = Results()
    for rnd in (0, 1, 2):
        res.add("write 256 MiB bs=1M +fsync", "native", Sample(rnd, 1.0))
        res.add("write 256 MiB bs=1M +fsync", "nocap", Sample(rnd, 1.2, settle=0.3))
        res.add("write 256 MiB bs=1M +fsync", "cap", Sample(rnd, 1.5, settle=settle))
    return res


def test_row_met_when_captures_keep_up():
    (row,) = report.summarize(_results(0.3))
    assert row["cap"]["median"] == 1.5 and row["settle_ok"] and row["met"]
    assert report.table_rows([row])[1][0][-1] == "0.3 s"


def test_row_fails_when_captures_fall_behind():
    (row,) = report.summarize(_results(report.SETTLE_LIMIT + 5))
    assert row["cap"]["median"] == 1.5  # within the ratio target, but
    assert row["settle_ok"] is False and row["met"] is False
    assert "fell behind" in report.table_rows([row])[1][0][-1]
