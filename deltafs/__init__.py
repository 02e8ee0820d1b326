"""deltafs: a FUSE filesystem that keeps a block-level history of every save."""

__version__ = "0.1.0"
