"""deltafs: a FUSE filesystem that keeps a block-level history of every save."""

__version__ = "0.1.0"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python child process that must run this same
    deltafs: ``env`` (default: ours) with the directory holding this package
    first on PYTHONPATH.  A child started elsewhere (the daemon's cwd is
    ``/``) would otherwise import whatever deltafs the interpreter finds
    first, e.g. an editable install of another checkout.  An installed
    deltafs (in site-packages) is what the child finds anyway: ``env`` is
    left as it is (site-packages on PYTHONPATH would come before the
    standard library)."""
    import os
    import site

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = dict(os.environ if env is None else env)
    if root in {*site.getsitepackages(), site.getusersitepackages()}:
        return out
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    out["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return out
