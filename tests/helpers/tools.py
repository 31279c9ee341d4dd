"""External tools a test drives for real (node_exporter, promtool, tmux, an XSD from PyPI): present, or
skipped with the reason, unless ``PEFTNODE_REQUIRE_TOOLS=1`` (CI) turns a missing tool into a failure so
that a CI machine without it can never pass silently."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_ENV = "PEFTNODE_REQUIRE_TOOLS"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing(why: str) -> None:
    """Skip (or, under PEFTNODE_REQUIRE_TOOLS=1, fail) with ``why``."""
    if required():
        pytest.fail(f"{why} ({REQUIRE_ENV}=1: tools are required here)", pytrace=False)
    pytest.skip(why)


def require_tool(name: str, why: str) -> str:
    """The absolute path of the program ``name`` (a name on PATH or a path), else skip/fail saying ``why``."""
    found = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
    if not found:
        missing(f"{name} is not installed: {why}")
    return str(Path(found))
