"""The docs say what the code does: exit codes, control-socket operations,
journal format versions (STYLE.md: every rule the docs state about the code
has a test that fails when the code drifts)."""

from __future__ import annotations

import re
from pathlib import Path

from deltafs import control, errors
from deltafs.journal import FORMAT_VERSION, UPGRADABLE

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = (ROOT / "docs" / "cli.md").read_text()
FORMAT_MD = (ROOT / "docs" / "format.md").read_text()
README = (ROOT / "README.md").read_text()


def section(text: str, heading: str) -> str:
    """The body of the markdown section ``heading`` (up to the next heading of its level or above)."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert m, f"no section {heading!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end(): end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row (header and rule rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| :]+\|$", line):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
    return rows[1:] if rows else rows


def numbers(phrase: str) -> set[int]:
    """{1, 2, 3} from "1, 2 or 3", "1 and 2", "1-3", "1–3"."""
    out = set()
    for a, b in re.findall(r"(\d+)\s*[-–]\s*(\d+)", phrase):
        out.update(range(int(a), int(b) + 1))
    out.update(int(n) for n in re.findall(r"\d+", re.sub(r"\d+\s*[-–]\s*\d+", "", phrase)))
    return out


def test_every_exit_code_is_in_the_cli_table():
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    rows = table_rows(section(CLI_MD, "Exit status"))
    documented = {row[1].strip("`"): int(row[0]) for row in rows}
    assert documented == codes, "docs/cli.md 'Exit status' table vs deltafs/errors.py"
    for cls in (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.DeltafsError)):
        assert cls.exit_code in codes.values(), cls


def test_every_control_socket_op_is_in_the_cli_table():
    rows = table_rows(section(CLI_MD, "Control socket"))
    documented = {row[0].strip("`") for row in rows}
    assert documented == set(control._OPS), "docs/cli.md 'Control socket' table vs the ops the daemon answers"


def test_the_format_version_and_its_upgrades_are_documented():
    log = {int(row[0]): row[1] for row in table_rows(section(FORMAT_MD, "Format version log"))
           if row[0].isdigit()}
    assert max(log) == FORMAT_VERSION, "docs/format.md's version log ends at another format"
    assert set(UPGRADABLE) | {FORMAT_VERSION} <= set(log)
    for v in range(min(UPGRADABLE) + 1, FORMAT_VERSION + 1):  # each step says how it is upgraded
        assert "A writer opening" in log[v], f"format {v}'s log entry does not say how a journal gets there"
    meta = next(row[1] for row in table_rows(section(FORMAT_MD, "`meta`")) if row[0] == "`format`")
    m = re.search(r"this page: \*\*(\d+)\*\*\)\. ([^:]+): upgraded by the first writer", meta)
    assert m and int(m.group(1)) == FORMAT_VERSION and numbers(m.group(2)) == set(UPGRADABLE), meta


def test_the_readme_upgrade_claim_names_every_upgradable_format():
    m = re.search(r"\(formats? ([^)]*)\) is upgraded\s+in\s+place", README)
    assert m, "README lost its sentence on upgrading old journals"
    assert numbers(m.group(1)) == set(UPGRADABLE)


def test_numbers_reads_the_phrases_the_docs_use():
    assert numbers("1, 2 or 3") == {1, 2, 3} == numbers("1–3") == numbers("1-3")
    assert numbers("1 and 2") == {1, 2} and numbers("4") == {4}
