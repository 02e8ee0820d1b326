"""Issue 20: `git checkout` through the mount gets delta bases.

git replaces each changed file by unlink + create, so without a base hint
every changed chunk of every file was stored whole (60 files of 18 KiB
with 3 lines changed each: 369 KB of chunks; git's pack grows 5.5 KB).
Here the chunks a checkout between two such commits stores must cost less
than `git gc --aggressive` grows the repository's pack for the same
change.  The records (unlink, create and write per file, about 330 bytes
together as LMDB values, 3.6x git's growth) are checked as compaction
stores them: in record blocks that keep two hashes per block (format 6),
about 126 bytes per file, 1.4x git's growth (tools/bench/history_size_where
has the whole breakdown).  The repository's .git lives outside the mount,
so only the work tree is journaled.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from deltafs.journal import Journal
from deltafs.journal import compact as JC
from deltafs.journal import schema as S
from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "LC_ALL": "C", "PATH": "/usr/bin:/bin"}
FILES = 60


def git(*args, cwd) -> str:
    res = subprocess.run(["git", *map(str, args)], cwd=cwd, env=GIT_ENV, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"git {' '.join(map(str, args))}: {res.stderr}"
    return res.stdout


def pack_bytes(repo: Path) -> int:
    git("gc", "-q", "--aggressive", "--prune=now", cwd=repo)
    return sum(p.stat().st_size for p in (repo / ".git" / "objects" / "pack").glob("*.pack"))


def journal_size(journal: Path) -> tuple[int, int, list[bytes]]:
    """(chunk bytes stored, bytes of every record, every record's stored value)."""
    with Journal.open(str(journal), readonly=True) as j, j.reader() as r:
        values = [bytes(r.raw_record(s)) for s in range(1, r.head_seq() + 1)]
        return r.stats()["stored_bytes"], sum(map(len, values)), values


def block_bytes(values: list[bytes]) -> int:
    """What compaction stores for these records (schema.encode_record_block, 32 a block)."""
    return sum(len(S.encode_record_block(values[i:i + JC.RECORD_BLOCK]))
               for i in range(0, len(values), JC.RECORD_BLOCK))


def _source(rnd: random.Random, i: int) -> list[str]:
    return [f"def f_{i}_{k}(x, y):\n    return x * {rnd.randrange(1000)} + y - {rnd.randrange(1000)}"
            f"  # {rnd.randbytes(12).hex()}\n" for k in range(300)]


def test_git_checkout_grows_the_journal_less_than_git_gc(mounted, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    rnd = random.Random(20)
    files = {f"m{i}.py": _source(rnd, i) for i in range(FILES)}
    for name, lines in files.items():
        (repo / name).write_text("".join(lines))
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "a", cwd=repo)
    a = git("rev-parse", "HEAD", cwd=repo).strip()
    pack_a = pack_bytes(repo)
    for name, lines in files.items():  # a few lines changed in every file
        for k in rnd.sample(range(len(lines)), 3):
            lines[k] = lines[k].replace("return", "return -")
        (repo / name).write_text("".join(lines))
    git("commit", "-q", "-am", "b", cwd=repo)
    b = git("rev-parse", "HEAD", cwd=repo).strip()
    git_growth = pack_bytes(repo) - pack_a

    work = mounted.mnt / "work"
    work.mkdir()
    wt = ("--git-dir", repo / ".git", "--work-tree", work)
    git(*wt, "checkout", "-q", "-f", a, cwd=tmp_path)
    run_cli("flush", mounted.mnt, check=True)
    before = journal_size(mounted.journal)
    git(*wt, "checkout", "-q", b, cwd=tmp_path)
    run_cli("flush", mounted.mnt, check=True)
    after = journal_size(mounted.journal)
    chunks, records = after[0] - before[0], after[1] - before[1]
    growth = chunks + records
    for name, lines in files.items():
        assert (work / name).read_text() == "".join(lines)
    blocks = block_bytes(after[2][len(before[2]):])
    print(f"git checkout of {FILES} files, 3 lines each: journal +{growth} bytes ({chunks} chunks, "
          f"{records} records, {blocks} once in record blocks), "
          f"git gc --aggressive +{git_growth} bytes")
    assert chunks < git_growth, (chunks, records, git_growth)
    assert blocks < 2 * git_growth, (blocks, records, git_growth)
