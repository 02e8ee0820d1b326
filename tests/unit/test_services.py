"""Daemon services hand typed handles to task_status.started, and the control
server answers `status` with the callable it was given (no mount: a real
control socket in a temporary journal directory, driven by the real client)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from deltafs import control
from deltafs.errors import EXIT_USAGE, DeltafsError, UsageError
from deltafs.mirrors.replicate import Mirrors


def test_control_server_uses_the_status_callable(tmp_path):
    jdir = tmp_path / "j"
    jdir.mkdir(mode=0o700)
    seen = []

    async def status(daemon):
        seen.append(daemon)
        return {"mounted": True, "probe": 42}

    daemon = SimpleNamespace(cfg=SimpleNamespace(journal=str(jdir), mnt="/m", mirrors=()), rec=None,
                             ops=SimpleNamespace(), services=SimpleNamespace(mirrors=Mirrors()))

    async def main():
        async with trio.open_nursery() as n:
            server = await n.start(control.serve, daemon, status)
            assert isinstance(server, control.ControlServer) and server.path == control.socket_path(str(jdir))
            out = await trio.to_thread.run_sync(lambda: control.request(str(jdir), "status", timeout=10))
            assert out["status"] == {"mounted": True, "probe": 42}
            with pytest.raises(DeltafsError, match="not a mirror of this mount") as e:
                await trio.to_thread.run_sync(
                    lambda: control.request(str(jdir), "pause", timeout=10, mirror="file:///nowhere"))
            assert e.value.exit_code == EXIT_USAGE
            n.cancel_scope.cancel()

    trio.run(main)
    assert seen == [daemon]
    assert not (jdir / control.SOCKET_NAME).exists()  # removed on exit


def test_mirrors_handle_finds_by_url():
    m = Mirrors()
    w = SimpleNamespace(url="file:///a")
    m.workers["file:///a"] = w
    assert "file:///a" in m and list(m) == [w]
    assert m.find("file:///a/") is w
    with pytest.raises(UsageError, match="its mirrors: file:///a"):
        m.find("file:///b")
    assert not m.can_add
