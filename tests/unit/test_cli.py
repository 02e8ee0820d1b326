"""The command line's own rules: every mount option reaches the background
daemon unchanged (MountConfig.to_argv), NotMountedError's exit code, and the
--help epilog is the exit-code table of deltafs/errors.py, and children run the
same deltafs as their parent."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from deltafs import cli, errors
from deltafs.config import MountConfig, RetentionPolicy

# One value per mount option, each different from its default.  A new option
# needs an entry here (test_every_option_is_listed fails until it has one).
EVERY_OPTION = {
    "foreground": True,
    "fuse_options": ("allow_other", "ro,noatime"),
    "debug": True,
    "capture": False,
    "log_level": "DEBUG",
    "mirrors": ("file:///tmp/m1", "s3://bucket/prefix"),
    "endpoint_url": "http://127.0.0.1:9000",
    "retention": RetentionPolicy(keep_all=3600.0, tiers=((86400.0, 60.0),), after=None, burst=2.5),
    "compact_every": 3.0,
    "journal_limit": 500 << 20,
    "metrics_addr": ("::1", 9108),
    "fd_budget": 64,
    "guard": "high",
    "on_alert": "notify-send deltafs",
    "history_dir": ".past",
    "guard_action": "block",
    "group": "file:///tmp/group",
}
NOT_TO_DAEMON = {"foreground", "group"}  # mount --group joins before the daemon starts  # spawn_daemon adds --foreground itself


def _parse(argv: list[str]) -> MountConfig:
    args = cli.build_parser().parse_args(argv)
    return MountConfig.from_args(args, args.src, args.mnt, args.journal)


def test_every_option_is_listed():
    assert {o.name for o in MountConfig.options()} == set(EVERY_OPTION)


@pytest.mark.parametrize("name", sorted(EVERY_OPTION))
def test_option_round_trips_through_the_daemon_argv(name):
    base = MountConfig(src="/s", mnt="/m", journal="/j")
    cfg = dataclasses.replace(base, **{name: EVERY_OPTION[name]})
    assert cfg != base
    back = _parse(cfg.to_argv())
    assert back == (base if name in NOT_TO_DAEMON else cfg)


def test_all_options_at_once_round_trip():
    cfg = MountConfig(src="/s", mnt="/m", journal="/j",
                      **{k: v for k, v in EVERY_OPTION.items() if k not in NOT_TO_DAEMON})
    assert _parse(cfg.to_argv()) == cfg


def test_defaults_give_a_short_argv():
    assert MountConfig(src="/s", mnt="/m", journal="/j").to_argv() == ["mount", "/s", "/m", "--journal", "/j"]


def test_no_history_dir_round_trips():
    cfg = MountConfig(src="/s", mnt="/m", journal="/j", history_dir=None)
    assert "--no-history-dir" in cfg.to_argv()
    assert _parse(cfg.to_argv()) == cfg


@pytest.mark.parametrize("bad", ["a/b", ".", ".."])
def test_bad_history_dir_is_one_usage_error(bad):
    args = cli.build_parser().parse_args(["mount", "/s", "/m", "--history-dir", bad])
    with pytest.raises(errors.UsageError, match="--history-dir"):
        MountConfig.from_args(args, "/s", "/m", "/j")


def test_bad_option_is_one_usage_error():
    args = cli.build_parser().parse_args(["mount", "/s", "/m", "--fd-budget", "2"])
    with pytest.raises(errors.UsageError, match="--fd-budget"):
        MountConfig.from_args(args, "/s", "/m", "/j")


def test_not_mounted_error_exit_code():
    assert issubclass(errors.NotMountedError, errors.UsageError)
    assert errors.NotMountedError("x").exit_code == errors.EXIT_USAGE == 2


def test_flush_of_an_unmounted_journal_is_ok(tmp_path, capsys):
    from deltafs.journal import Journal

    Journal.open(str(tmp_path / "j"), create=True).close()
    assert cli.main(["flush", "--journal", str(tmp_path / "j"), "--json"]) == 0  # NotMountedError caught
    assert '"mounted": false' in capsys.readouterr().out
    assert cli.main(["pause", "--journal", str(tmp_path / "j")]) == errors.EXIT_USAGE
    assert "is not mounted" in capsys.readouterr().err


def test_epilog_is_the_exit_code_table_of_errors_py():
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert set(errors.CODE_MEANINGS) == codes
    text = " ".join(cli.EPILOG.split())
    for code, meaning in errors.CODE_MEANINGS.items():
        assert re.search(rf"\b{code} {re.escape(meaning)}\b", text), (code, meaning)
    assert " ".join(cli.build_parser().format_help().split()).count(text.split(" See ")[0]) == 1


def test_child_env_runs_this_deltafs_first(monkeypatch):
    """Children (the daemon, re-coding plans, run-apart writers) import the
    deltafs that started them: its root leads PYTHONPATH, once."""
    import deltafs
    root = os.path.dirname(os.path.dirname(os.path.abspath(deltafs.__file__)))
    env = deltafs.child_env({"PYTHONPATH": os.pathsep.join(["/elsewhere", root]), "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert env["HOME"] == "/h"
    assert deltafs.child_env({})["PYTHONPATH"] == root
    # installed in site-packages: nothing to add (it would shadow the standard library)
    import site
    monkeypatch.setattr(site, "getsitepackages", lambda: [root])
    assert "PYTHONPATH" not in deltafs.child_env({"HOME": "/h"})
