"""Operator sub-commands: `restore`, `list`, `verify`, `doctor`, `status` (filled in by the operator work)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the operator sub-commands to the CLI's sub-parser collection."""
    del sub
