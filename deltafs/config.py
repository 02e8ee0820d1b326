"""Mount options as a frozen dataclass, validated once in cli/mount."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_JOURNAL_NAME = ".deltafs"


@dataclass(frozen=True)
class MountConfig:
    src: str
    mnt: str
    journal: str
    foreground: bool = False
    fuse_options: tuple[str, ...] = ()
    debug: bool = False
    capture: bool = True
    log_level: str = "INFO"
    log_file: str | None = None
    timeout: float = 86400.0  # kernel entry/attribute cache lifetime, seconds
    mirrors: tuple[str, ...] = field(default_factory=tuple)
    endpoint_url: str | None = None  # S3 endpoint for s3:// mirrors (--endpoint-url)

    @property
    def journal_in_src(self) -> bool:
        j = os.path.realpath(self.journal)
        s = os.path.realpath(self.src)
        return j == s or j.startswith(s + "/")
