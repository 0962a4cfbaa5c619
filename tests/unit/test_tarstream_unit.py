"""One file's data in the tar stream: exactly the size its header gave, whatever the file did
between its fstat and its read. Small files take a one-read path, large ones the general
loop; both must write the same bytes and the same warnings."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from instance_agent.tarstream import READ_SIZE, TarStream


def _copied(path: Path, size: int, hash_name: str = "none") -> tuple[bytes, str | None, list[str]]:
    out = io.BytesIO()
    stream = TarStream(out, deadline=None, clock=time.monotonic, hash_name=hash_name)
    fd = os.open(path, os.O_RDONLY)
    try:
        digest, cut_at = stream._copy(fd, os.fsencode(path), size)
    finally:
        os.close(fd)
    assert cut_at is None
    stream._flush()
    return out.getvalue(), digest, [w.reason for w in stream.report.warnings]


@pytest.mark.parametrize("length", [0, 1, 100, 512, 5000, READ_SIZE + 3])
def test_a_file_read_whole_is_its_bytes_then_zeros_to_the_block(tmp_path: Path, length: int) -> None:
    body = os.urandom(length)
    (tmp_path / "f").write_bytes(body)
    data, digest, warnings = _copied(tmp_path / "f", length, "sha256")
    assert data == body + bytes(-length % 512) and warnings == []
    assert digest == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("length", [100, READ_SIZE + 3])
def test_a_file_shorter_than_its_header_says_is_padded_and_warned(tmp_path: Path, length: int) -> None:
    body = os.urandom(length)
    (tmp_path / "f").write_bytes(body)
    data, digest, warnings = _copied(tmp_path / "f", length + 50, "sha256")
    assert data == body + bytes(50) + bytes(-(length + 50) % 512)
    assert warnings == [f"shrank during read from {length + 50} to {length} bytes; padded with zeros"]
    assert digest == hashlib.sha256(body + bytes(50)).hexdigest()


@pytest.mark.parametrize("length", [100, READ_SIZE + 3])
def test_a_file_longer_than_its_header_says_is_cut_and_warned(tmp_path: Path, length: int) -> None:
    body = os.urandom(length + 50)
    (tmp_path / "f").write_bytes(body)
    data, digest, warnings = _copied(tmp_path / "f", length, "sha256")
    assert data == body[:length] + bytes(-length % 512)
    assert warnings == [f"grew during read; cut at {length} bytes"]
    assert digest == hashlib.sha256(body[:length]).hexdigest()


def test_an_empty_file_that_grew_is_warned(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"late")
    data, _, warnings = _copied(tmp_path / "f", 0)
    assert data == b"" and warnings == ["grew during read; cut at 0 bytes"]
