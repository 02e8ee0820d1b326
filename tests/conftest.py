import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from fusetools import Mount  # noqa: E402

import deltafs  # noqa: E402

# Every `python -m deltafs` these tests start (mounts, CLI runs from any cwd,
# daemons) imports the deltafs under test, not an editable install of another
# checkout (a worktree's tests would otherwise run main's daemon code).
os.environ.update(PYTHONPATH=deltafs.child_env()["PYTHONPATH"])


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory, monkeypatch):
    """Per-user state (the mirror versions an encrypted mirror's readers have
    seen) goes to a temp dir, never to the real ~/.local/state."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def mount_factory(tmp_path):
    """Make mounts on demand; every one is unmounted at teardown, even on failure."""
    made: list[Mount] = []

    def make(src: Path | None = None, *extra: str, journal: Path | None = None,
             mnt: Path | None = None, start: bool = True, prefix: list[str] | None = None) -> Mount:
        n = len(made)
        src = src or tmp_path / f"src{n}"
        mnt = mnt or tmp_path / f"mnt{n}"
        src.mkdir(exist_ok=True)
        mnt.mkdir(exist_ok=True)
        m = Mount(src, mnt, *extra, journal=journal, prefix=prefix)
        made.append(m)
        return m.start() if start else m

    yield make
    for m in made:
        m.cleanup()


@pytest.fixture
def mounted(mount_factory):
    """One running mount: .src, .mnt, .journal; unmounted cleanly at the end."""
    m = mount_factory()
    yield m
    if m.proc is not None:
        m.umount()


_TIERS = ("unit", "ops", "mount", "mirrors")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (its directory under tests/): `make check` selects unit + ops."""
    root = Path(__file__).parent
    for item in items:
        try:
            tier = Path(item.fspath).relative_to(root).parts[0]
        except ValueError:
            continue
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))
