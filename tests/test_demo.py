"""`instance-agent demo` runs the whole story on the local stand-in and checks its own restore."""

from __future__ import annotations

import subprocess
import sys


def test_demo_passes_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "instance_agent", "demo", "--size-mib", "8"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert "target-lifecycle-state=Terminated" in out
    assert "token-less reads: 0" in out
    assert "lifecycle action completed with CONTINUE" in out
    assert "identical to the source" in out
    assert out.count("SNS message") == 1
