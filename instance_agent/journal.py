"""Stream `journalctl -o export` of the previous and current boot into a sink, no temp file.

On Amazon Linux 2023 there is no rsyslog: the journal is where the logs are. Its live binary
files tear when copied, so they are excluded from the tar and exported here instead. Problems
with journalctl (missing, no journal, no previous boot) are warnings, never failures.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from instance_agent.tarstream import Sink

READ_SIZE = 1 << 20
BOOTS = ("-1", "0")  # the previous boot first, so the export reads in time order
POLL = 0.5  # seconds a read waits before the deadline and the cancel event are looked at


def _drain(stream: IO[bytes], out: list[bytes]) -> None:
    # stderr is read in its own thread so a chatty journalctl can never block on a full pipe.
    data = stream.read(4096)
    out.append(data)
    while stream.read(65536):
        pass


def export(
    sink: Sink,
    *,
    deadline: float | None,
    clock: Callable[[], float] = time.monotonic,
    journalctl: str | None = None,
    cancel: threading.Event | None = None,
) -> tuple[int, list[str]]:
    """Write the export stream into `sink`. Returns (bytes, warnings).

    A journalctl that prints nothing (a locked or corrupt journal, a hung disk) must not hold
    the run past --max-duration or a stop: reads wait at most POLL at a time, and at the
    deadline or on cancel the child is killed and reaped, never left behind."""
    exe = journalctl or shutil.which("journalctl")
    if not exe:
        return 0, ["journalctl not found; journal not exported"]
    total, warnings = 0, []
    for boot in BOOTS:
        if deadline is not None and clock() >= deadline:
            warnings.append(f"journal boot {boot} not exported: past --max-duration")
            continue
        proc = subprocess.Popen(
            [exe, "-o", "export", "--no-pager", "-b", boot],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        err_chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(proc.stderr, err_chunks), daemon=True)
        reader.start()
        cut = stopped = False
        before = total
        fd = proc.stdout.fileno()
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    stopped = True
                    break
                if deadline is not None and clock() >= deadline:
                    cut = True
                    break
                ready, _, _ = select.select([fd], [], [], POLL)
                if not ready:
                    continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    break
                sink.write(chunk)
                total += len(chunk)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
        if stopped:
            reader.join(timeout=5)
            warnings.append(f"journal boot {boot} cut: the run was stopped")
            break
        reader.join(timeout=5)
        if cut:
            warnings.append(f"journal boot {boot} cut at --max-duration")
        elif rc != 0:
            text = b"".join(err_chunks).decode(errors="replace").strip().splitlines()
            warnings.append(f"journalctl -b {boot} exited {rc}: {text[0] if text else 'no message'}")
        elif total == before:
            # It exits 0 when the journal holds nothing for the boot id it reads from /proc:
            # in a container whose service sees the kernel's boot id, not the journal's.
            warnings.append(
                f"journalctl -b {boot} printed nothing: the journal holds no entries for "
                "the boot id this process sees"
            )
    return total, warnings
