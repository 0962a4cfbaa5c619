"""Sub-commands of the watcher: `watch` and `install-service` (filled in by the watcher work)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the watcher's sub-commands to the CLI's sub-parser collection."""
    del sub


__all__ = ["argparse", "register"]
