"""history_size's restore check: every git state must read back from the journal (issue 20)."""

from __future__ import annotations

import subprocess

import pytest

from deltafs.journal import Journal
from tools.bench import history_size as hs

from test_journal import FakeClock
from test_packs import edits


def git_states(repo, states: list[bytes]) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=hs.GIT_ENV)
    for i, data in enumerate(states):
        (repo / "f").write_bytes(data)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=hs.GIT_ENV)
        subprocess.run(["git", "commit", "-q", "-m", f"state {i}"], cwd=repo, check=True, env=hs.GIT_ENV)


def test_every_state_reads_back_and_a_missing_one_fails(tmp_path):
    jp = tmp_path / "j"
    with Journal.open(jp, create=True, clock=FakeClock()) as j:
        seqs, content = edits(j, 6)
    states = [content[s] for s in seqs]
    git_states(tmp_path / "good", states)
    got = hs.check_restore(str(jp), str(tmp_path / "good"), "f")
    assert got["git_blobs"] == 6 and got["versions_read"] == 6 and got["missing"] == 0
    assert got["bytes_read"] == sum(map(len, states))
    git_states(tmp_path / "bad", states + [states[-1] + b"one more line\n"])
    with pytest.raises(RuntimeError, match="1 of 7 git states do not restore"):
        hs.check_restore(str(jp), str(tmp_path / "bad"), "f")
