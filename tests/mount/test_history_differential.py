"""Differential test of history itself (issue 18): what the journal says a
path held is what it held.

A hypothesis state machine runs random sequences of file operations through
a real mount: create, write, append, truncate, atomic saves through a temp
name (ignored or not) and rename, renames to free names and over files,
unlink and re-create, hard links, symlinks, mkdir/rmdir, chmod, xattrs, the
vim backup-rename save and log rotation.  Names come from a small alphabet,
so operations collide and the identity rules (docs/design.md, "File
identity") are exercised: a re-created path, a file still linked or renamed
elsewhere.  At recorded moments (after `deltafs flush`) it copies the tree
as SRC holds it.  At the end of each sequence:

* `deltafs restore DIR --version V --to DEST` at every moment equals the
  copy taken then: paths, types, content, permission bits, symlink
  targets, user xattrs and hard-link groups;
* `deltafs cat` of every file equals SRC's file, and of every absent path
  fails;
* `deltafs log PATH` lists only records naming PATH; where its newest
  record by a moment is a content version, that version is what PATH held
  then; `log --follow` of each file lists its current content.

Each sequence works in its own directory of one mount.  The CI profile is
bounded (a few sequences, well under a minute);
DELTAFS_HISTORY_EXAMPLES=200 runs a long search.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from deltafs.ignore import Ignore
from fusetools import run_cli

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("DELTAFS_HISTORY_EXAMPLES", "4"))
STEPS = int(os.environ.get("DELTAFS_HISTORY_STEPS", "25"))
settings.register_profile("history-ci", max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

NAMES = ["a", "b", "c", "d/a", "d/b"]
DIRS = ["d", "e"]
TEMPS = ["a.swp", "b.tmp", "a.new", "d/a.swp"]  # the first, second and last are ignored names
DATA = st.binary(min_size=0, max_size=64) | st.sampled_from([b"x" * 5000, bytes(range(256)) * 40])


def snapshot(root: Path) -> dict:
    """Everything under root: path -> (type, content or target, mode, user xattrs); link groups."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    ignore = Ignore(str(root))  # a temp file left by a failed save is not journaled
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            s = p.lstat()
            if ignore.match(rel.encode(), stat.S_ISDIR(s.st_mode)):
                continue
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("l", os.readlink(p), None, None)
                continue
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False) if k.startswith("user.")}
            if stat.S_ISDIR(s.st_mode):
                out[rel] = ("d", None, stat.S_IMODE(s.st_mode), xattrs)
            else:
                out[rel] = ("f", p.read_bytes(), stat.S_IMODE(s.st_mode), xattrs)
                inodes.setdefault(s.st_ino, []).append(rel)
    return {"entries": out, "links": sorted(sorted(g) for g in inodes.values() if len(g) > 1)}


def differences(a: dict, b: dict) -> dict:
    ea, eb = a["entries"], b["entries"]
    d = {k: (ea.get(k), eb.get(k)) for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)}
    if a["links"] != b["links"]:
        d["<hard links>"] = (a["links"], b["links"])
    return d


def log_json(*args) -> list[dict]:
    res = run_cli("log", "--records", *args, "--json", check=True)
    return [json.loads(x) for x in res.stdout.decode().splitlines()]


def make_machine(mount, tmp: Path, counter: list[int]):
    class History(RuleBasedStateMachine):
        @initialize()
        def start(self):
            counter[0] += 1
            self.name = f"ex{counter[0]}"
            self.root = mount.mnt / self.name
            self.root.mkdir()
            self.moments: list[tuple[int, dict]] = []
            self.moment()

        def p(self, rel: str) -> Path:
            return self.root / rel

        def attempt(self, fn, *args) -> None:
            try:
                fn(*args)
            except OSError:
                pass  # the name does not exist, is a directory, ...: nothing happened

        # ---- content ----------------------------------------------------------
        @rule(name=st.sampled_from(NAMES), data=DATA)
        def write(self, name, data):
            def w():
                with open(self.p(name), "wb") as f:
                    f.write(data)
            self.attempt(w)

        @rule(name=st.sampled_from(NAMES), data=DATA)
        def append(self, name, data):
            def w():
                with open(self.p(name), "ab") as f:
                    f.write(data)
            self.attempt(w)

        @rule(name=st.sampled_from(NAMES), size=st.integers(0, 6000))
        def truncate(self, name, size):
            self.attempt(os.truncate, self.p(name), size)

        @rule(name=st.sampled_from(NAMES), tmp=st.sampled_from(TEMPS), data=DATA)
        def atomic_save(self, name, tmp, data):
            def w():
                t = self.p(name).parent / Path(tmp).name
                with open(t, "wb") as f:
                    f.write(data)
                os.rename(t, self.p(name))
            self.attempt(w)

        @rule(name=st.sampled_from(NAMES), data=DATA)
        def vim_backup_save(self, name, data):
            def w():
                p = self.p(name)
                os.rename(p, str(p) + "~")
                with open(p, "wb") as f:
                    f.write(data)
                os.unlink(str(p) + "~")
            self.attempt(w)

        @rule(name=st.sampled_from(NAMES), data=DATA)
        def rotate(self, name, data):
            def w():
                p = self.p(name)
                if os.path.lexists(str(p) + ".1"):
                    os.rename(str(p) + ".1", str(p) + ".2")
                os.rename(p, str(p) + ".1")
                with open(p, "wb") as f:
                    f.write(data)
            self.attempt(w)

        # ---- names ------------------------------------------------------------
        @rule(old=st.sampled_from(NAMES + TEMPS + DIRS), new=st.sampled_from(NAMES + DIRS))
        def rename(self, old, new):
            self.attempt(os.rename, self.p(old), self.p(new))

        @rule(name=st.sampled_from(NAMES + TEMPS))
        def unlink(self, name):
            self.attempt(os.unlink, self.p(name))

        @rule(old=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
        def link(self, old, new):
            self.attempt(os.link, self.p(old), self.p(new))

        @rule(name=st.sampled_from(NAMES), dest=st.sampled_from(["a", "../a", "nowhere", "d"]))
        def symlink(self, name, dest):
            self.attempt(os.symlink, dest, self.p(name))

        @rule(name=st.sampled_from(DIRS))
        def mkdir(self, name):
            self.attempt(os.mkdir, self.p(name))

        @rule(name=st.sampled_from(DIRS))
        def rmdir(self, name):
            self.attempt(os.rmdir, self.p(name))

        # ---- attributes -------------------------------------------------------
        @rule(name=st.sampled_from(NAMES + DIRS), mode=st.sampled_from([0o600, 0o644, 0o755, 0o640]))
        def chmod(self, name, mode):
            if not self.p(name).is_symlink():
                self.attempt(os.chmod, self.p(name), mode)

        @rule(name=st.sampled_from(NAMES), key=st.sampled_from(["user.a", "user.b"]),
              value=st.binary(max_size=8))
        def setxattr(self, name, key, value):
            if not self.p(name).is_symlink():
                self.attempt(os.setxattr, self.p(name), key, value)

        @rule(name=st.sampled_from(NAMES), key=st.sampled_from(["user.a", "user.b"]))
        def removexattr(self, name, key):
            if not self.p(name).is_symlink():
                self.attempt(os.removexattr, self.p(name), key)

        # ---- moments ------------------------------------------------------------
        @rule()
        def moment(self):
            run_cli("flush", mount.mnt, check=True)
            now = snapshot(self.root)
            head = log_json(mount.mnt, "-n", "1")[0]["version"]
            self.moments.append((head, now))

        def teardown(self):
            if not hasattr(self, "root"):
                return
            self.moment()
            final = self.moments[-1][1]
            for i, (version, then) in enumerate(self.moments):
                dest = tmp / f"{self.name}-at-{version}-{i}"
                run_cli("restore", self.root, "--version", version, "--to", dest, check=True)
                d = differences(then, snapshot(dest))
                assert not d, f"restore of {self.name} at version {version} differs (SRC then, restored): {d}"
            for rel in sorted(set(NAMES + DIRS) | set(final["entries"])):
                e = final["entries"].get(rel)
                res = run_cli("cat", self.p(rel))
                if e is None:
                    assert res.returncode != 0, f"cat {rel}: the journal has it, SRC does not"
                    continue
                if e[0] != "f":
                    continue
                assert res.returncode == 0, f"cat {rel}: {res.stderr.decode()}"
                assert res.stdout == e[1], f"cat {rel}: {res.stdout[:40]!r} but SRC holds {e[1][:40]!r}"
                rows = log_json(self.p(rel))
                full = f"{self.name}/{rel}"
                assert all(full in (d["path"], d.get("path2")) for d in rows), f"log {rel} lists other paths"
                for version, then in self.moments:  # the newest record about rel by a moment, if a
                    before = [d for d in rows if d["version"] <= version]  # version, is what rel held
                    te = then["entries"].get(rel)
                    if before and before[0]["op"] == "write" and te is not None and te[0] == "f":
                        got = run_cli("cat", self.p(rel), "--version", before[0]["version"], check=True).stdout
                        assert got == te[1], f"log {rel}: version {before[0]['version']} is not what it held"
                if e[1]:
                    followed = {run_cli("cat", "--journal", mount.journal, d["path"], "--version",
                                        d["version"], check=True).stdout
                                for d in log_json(self.p(rel), "--follow") if d["op"] == "write"}
                    assert e[1] in followed, f"log --follow {rel} lacks the current content"

    return History


def test_history_matches_what_src_held(mounted, tmp_path):
    counter = [0]
    machine = make_machine(mounted, tmp_path, counter)
    run_state_machine_as_test(machine, settings=settings.get_profile("history-ci"))
    assert counter[0] >= 1
    mounted.umount()
