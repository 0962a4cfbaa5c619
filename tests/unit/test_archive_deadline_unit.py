"""--max-duration inside one file (issue 19 item 9): the deadline is looked at between reads
of a file, not only between files. A file cut short keeps its header's size (the header is
written before the data), its rest is zeros, and the manifest says where it was cut."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

from fakes import FakeClock

from instance_agent.archive import Archiver
from instance_agent.tarstream import READ_SIZE


class _TickingClock(FakeClock):
    """Each look at the time costs a second of it: a read of 1 MiB "takes" a second."""

    def __call__(self) -> float:
        now = self.now
        self.now += 1.0
        return now


def _archive(src: Path, deadline: float) -> tuple[bytes, Archiver]:
    sink = io.BytesIO()
    arch = Archiver(sink, deadline=deadline, clock=_TickingClock(0.0), hash_name="sha256")
    arch.add_sources([str(src)])
    arch.finish()
    return sink.getvalue(), arch


def _member(tar: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(name))
        return tf.extractfile(member).read()  # type: ignore[union-attr]


def test_a_large_file_is_cut_at_the_deadline_and_the_manifest_says_where(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(12 * READ_SIZE)
    (src / "big.log").write_bytes(data)
    tar, arch = _archive(src, deadline=6.0)

    report = arch.report
    assert report.stopped_early
    [(path, kept, size)] = report.cut
    assert path.endswith(b"big.log") and size == len(data) and 0 < kept < size
    [entry] = [e for e in report.entries() if e["type"] == "file"]
    assert entry["cut_at"] == kept and entry["size"] == len(data)
    assert "sha256" not in entry  # a digest of half a file would verify what was never saved
    assert any("cut short" in w.reason for w in report.warnings)

    # The archive is whole: GNU tar lists it, and the member holds what was read, then zeros.
    (tmp_path / "a.tar").write_bytes(tar)
    listed = subprocess.run(["tar", "-tvf", str(tmp_path / "a.tar")], capture_output=True, check=True)
    assert b"big.log" in listed.stdout
    stored = _member(tar, "big.log")
    assert stored[:kept] == data[:kept] and stored[kept:] == bytes(size - kept)


def test_a_file_read_before_the_deadline_is_whole(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * READ_SIZE)
    (src / "small.log").write_bytes(data)
    tar, arch = _archive(src, deadline=1000.0)
    assert not arch.report.stopped_early and arch.report.cut == []
    [entry] = [e for e in arch.report.entries() if e["type"] == "file"]
    assert "cut_at" not in entry and entry["sha256"]
    assert _member(tar, "small.log") == data
