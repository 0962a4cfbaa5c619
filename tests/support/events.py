"""AWS's own sample events, kept beside the tests (tests/fixtures/events/) under their
original names: `<source>-<what>.<where it came from>-<year>.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "events"


def sample(name: str) -> dict[str, Any]:
    """One sample event, parsed."""
    data: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text())
    return data
