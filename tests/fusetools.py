"""Real-mount helpers shared by every test that touches FUSE.

``Mount`` starts ``deltafs mount --foreground`` as a subprocess, waits for
its ready signal (a pipe, no polling), and always unmounts: ``deltafs
umount`` first (asserting a clean daemon exit), then ``fusermount3 -u``,
then ``-uz``, then kill, so no test ever leaves a mount behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DELTAFS = [sys.executable, "-m", "deltafs"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_fuse() -> None:
    """Skip (or, with CI=true, fail) when this machine cannot mount FUSE."""
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (apt-get install fuse3)")
    if missing:
        reason = "FUSE is not available: missing " + ", ".join(missing)
        if IN_CI:
            pytest.fail(reason + " (CI=true: this is a failure, not a skip)")
        pytest.skip(reason)


def run_cli(*args: str, check: bool = False, input: bytes | None = None, timeout: float = 120,
            cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([*DELTAFS, *map(str, args)], capture_output=True, input=input,
                         timeout=timeout, cwd=cwd, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"deltafs {' '.join(map(str, args))} exited {res.returncode}: "
                             f"{res.stderr.decode(errors='replace')}")
    return res


class Mount:
    def __init__(self, src: Path, mnt: Path, *extra: str, journal: Path | None = None,
                 prefix: list[str] | None = None) -> None:
        self.src = Path(src)
        self.mnt = Path(mnt)
        self.journal = Path(journal) if journal else self.src / ".deltafs"
        self.extra = list(extra)
        self.prefix = list(prefix or [])  # e.g. ["prlimit", "--nofile=1024:1024"]
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.mnt.parent / f"{self.mnt.name}.daemon.log"

    def start(self) -> "Mount":
        require_fuse()
        r, w = os.pipe()
        args = [*self.prefix, *DELTAFS, "mount", "--foreground", str(self.src), str(self.mnt),
                "--ready-fd", str(w)]
        if self.journal != self.src / ".deltafs":
            args += ["--journal", str(self.journal)]
        args += self.extra
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(args, pass_fds=(w,), stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.readline()
            while msg.startswith(b"PROGRESS "):
                msg = f.readline()
        if msg != b"READY\n":
            self.proc.wait(timeout=30)
            raise AssertionError(f"mount failed: {msg!r}\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_mounted(self) -> bool:
        # Never stat the mount point: a broken mount answers EIO or hangs.
        return _in_mountinfo(os.path.abspath(self.mnt))

    def umount(self, check: bool = True) -> None:
        """Clean unmount through the CLI; asserts the daemon exited 0."""
        if self.proc is None:
            return
        res = run_cli("umount", self.mnt, timeout=120)
        rc = self.proc.wait(timeout=120)
        self.proc = None
        self._stderr.close()
        if check:
            assert res.returncode == 0, res.stderr.decode()
            assert rc == 0, f"daemon exited {rc}:\n{self.log_text()}"
            bad = [line for line in self.log_text().splitlines()
                   if " ERROR " in line or " WARNING " in line or "Traceback" in line]
            assert not bad, "daemon logged problems:\n" + "\n".join(bad)

    def versions(self) -> dict[bytes, list[tuple[int, bytes]]]:
        """Every content version the journal holds, per path, oldest first, as
        (record seq, content) (after :meth:`umount`: the journal opened read-only)."""
        from deltafs.journal import Journal

        out: dict[bytes, list[tuple[int, bytes]]] = {}
        with Journal.open(str(self.journal), readonly=True) as j, j.reader() as r:
            for rec in r.records():
                if rec.op == "write":
                    out.setdefault(rec.path, []).append((rec.seq, r.read_content(rec.seq)))
        return out

    def kill(self) -> None:
        """kill -9 the daemon, then clear the dead mount."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None
            self._stderr.close()
        force_unmount(self.mnt)

    def cleanup(self) -> None:
        """Teardown that always leaves no mount behind, whatever happened."""
        try:
            if self.proc is not None and self.proc.poll() is None and self.is_mounted():
                run_cli("umount", self.mnt, timeout=60)
                self.proc.wait(timeout=60)
        except Exception:
            pass
        finally:
            force_unmount(self.mnt)
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait(timeout=30)
                self.proc = None
                self._stderr.close()


def _in_mountinfo(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def force_unmount(mnt: Path) -> None:
    """fusermount3 -u, then -uz (lazy) if it is still there."""
    path = os.path.abspath(mnt)
    for args in (["fusermount3", "-u", path], ["fusermount3", "-uz", path]):
        if not _in_mountinfo(path):
            return
        subprocess.run(args, capture_output=True, timeout=30)
