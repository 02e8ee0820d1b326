"""Fixtures for the mirror conformance suite.

The S3 server fixtures live in s3server.py so other test packages can
import them; see its docstring.
"""

from __future__ import annotations

from s3server import s3_env, s3_outage, s3_server  # noqa: F401 (fixtures)
