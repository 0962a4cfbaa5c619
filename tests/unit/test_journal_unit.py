"""The journal export says so when a boot's export is empty, rather than archiving nothing
in silence (found by the system test: a service whose own /proc shows another boot id than
its journal's, as in a container, exported 0 bytes and reported nothing)."""

from __future__ import annotations

import io
from pathlib import Path

from instance_agent import journal

FAKE = """#!/bin/sh
case "$*" in
  *"-b -1"*) echo "Data from the specified boot (-1) is not available" >&2; exit 1;;
  *"-b 0"*) exit 0;;
esac
exit 2
"""


def test_an_empty_current_boot_is_a_warning(tmp_path: Path) -> None:
    fake = tmp_path / "journalctl"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    sink = io.BytesIO()

    total, warnings = journal.export(sink, deadline=None, journalctl=str(fake))

    assert total == 0 and sink.getvalue() == b""
    assert warnings[0].startswith("journalctl -b -1 exited 1: Data from the specified boot (-1)")
    assert warnings[1].startswith("journalctl -b 0 printed nothing:")
