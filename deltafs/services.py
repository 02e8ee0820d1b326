"""A running mount's daemon and the typed handles of its background services.

mount.py starts each service with ``await nursery.start(service, daemon)``;
a service hands its handle (what the others may use of it) to
``task_status.started(handle)``, and mount.py keeps it in :class:`Services`.
The control socket and ``deltafs status`` read the handles there, never
module state or string keys (docs/design.md, "Daemon services").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from deltafs.config import MountConfig
from deltafs.control import ControlServer
from deltafs.guard import Guard
from deltafs.maintenance import MaintenanceProgress
from deltafs.mirrors.replicate import Mirrors
from deltafs.sync.service import GroupSync


@dataclass
class Services:
    """The handles of the services that are running (None: not started)."""

    control: ControlServer | None = None  # control.serve
    maintenance: MaintenanceProgress | None = None  # maintenance.maintenance_service
    guard: "Guard | None" = None  # guard.guard_service (None: --guard off or --no-capture)
    mirrors: Mirrors = field(default_factory=Mirrors)  # mirrors.replicate.mirror_service (empty until then)
    sync: GroupSync | None = None  # sync.service.sync_service (None: the journal is in no sync group)


@dataclass
class Daemon:
    """What background services get: ``async def svc(daemon, task_status)``."""

    cfg: MountConfig
    journal: object  # journal.Journal, the mount's writer
    ops: object  # ops.Operations
    rec: object  # capture.Recorder, or None with --no-capture
    nursery: trio.Nursery
    started: float  # time.time() of the mount
    services: Services = field(default_factory=Services)


async def start_all(daemon: Daemon, nursery: trio.Nursery) -> None:
    """Start a mount's services in ``nursery``, in order, keeping their handles.

    A service that fails to start (e.g. --metrics-addr in use) raises its
    DeltafsError here: the mount fails rather than half-start."""
    from deltafs import control, maintenance, status
    from deltafs.guard import guard_service
    from deltafs.mirrors.replicate import mirror_service

    s = daemon.services
    s.control = await nursery.start(control.serve, daemon, status.daemon_status)
    s.guard = await nursery.start(guard_service, daemon)  # before maintenance: an alert holds its passes
    s.maintenance = await nursery.start(maintenance.maintenance_service, daemon)
    # mirror_service runs without mirrors too: `mirror add` may start one while mounted
    s.mirrors = await nursery.start(mirror_service, daemon)
    from deltafs.sync.service import sync_service

    s.sync = await nursery.start(sync_service, daemon)
    if daemon.cfg.metrics_addr:
        from deltafs.metrics import metrics_service

        await nursery.start(metrics_service, daemon)
