"""Restoring a shipped backup: the final archive and the segments its manifest names become
one tree. Each file a segment holds for the backup lands at the name the manifest gives it
(renamed since, or under two names), the segment's other members are left out, a file the
final archive already holds (or a path through one of its symlinks) fails the restore, and a
broken segment fails it in one line naming the segment, leaving nothing. The S3 reader is a
fake of listing.S3Reader."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import zstandard
from fakes import client_error

from instance_agent import assemble
from instance_agent.restore import RestoreError, UnsafeArchive

BUCKET = "b"
INSTANCE = "i-0123456789abcdef0"
PREFIX = f"logs/web/{INSTANCE}/"
FINAL = f"{PREFIX}20260101T000000Z.tar.zst"
SEG = f"{PREFIX}segments/app.log.3files-0123456789abcdef01234567.tar.zst"
OLD = 1_600_000_000

# (name, kind, data or link target)
Member = tuple[str, str, bytes | str]


class FakeS3:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        raise AssertionError("not listed")

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        if kwargs["Key"] not in self.objects:
            raise client_error("NoSuchKey", "no such key", 404)
        return {"Body": io.BytesIO(self.objects[kwargs["Key"]])}


def _tar(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = OLD, 0o640
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o750
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _backup(
    final: list[Member], segment: list[Member], held: list[tuple[str, str | None]]
) -> tuple[FakeS3, dict[str, Any]]:
    """The objects and the (format 1) manifest of a backup whose segment holds `held`:
    (name in the tree, member in the segment when it differs)."""
    final_tar, seg_tar = _tar(final), _tar(segment)
    data = {n: d for n, k, d in segment if k == "file"}
    entries: list[dict[str, Any]] = []
    for name, member in held:
        body = data[member or name]
        assert isinstance(body, bytes)
        entry = {
            "path": name,
            "type": "file",
            "size": len(body),
            "mtime": OLD,
            "mode": "0640",
            "sha256": hashlib.sha256(body).hexdigest(),
            "object": SEG,
        }
        if member is not None:
            entry["member"] = member
        entries.append(entry)
    doc = {
        "format": 1,
        "key": FINAL,
        "instance_id": INSTANCE,
        "totals": {"held_files": len(held), "tar_bytes": len(final_tar)},
        "segments": [{"key": SEG, "tar_bytes": len(seg_tar)}],
        "entries": entries,
    }
    c = zstandard.ZstdCompressor()
    return FakeS3({FINAL: c.compress(final_tar), SEG: c.compress(seg_tar)}), doc


def _restore(s3: FakeS3, doc: dict[str, Any], dest: Path) -> Any:
    return assemble.restore_assembled(s3, BUCKET, FINAL, doc, str(dest), digests=True)


def _files(root: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes()
        for d, _, names in os.walk(root)
        for f in names
    }


FINAL_TREE: list[Member] = [
    ("var", "dir", b""),
    ("var/log", "dir", b""),
    ("var/log/live.log", "file", b"live"),
]


def test_held_files_land_at_their_names_and_the_rest_of_the_segment_is_left_out(tmp_path: Path) -> None:
    segment: list[Member] = [
        ("var/log/app.log.1", "file", b"rotated since"),
        ("var/log/b.log", "file", b"one content, two names"),
        ("var/log/gone.log", "file", b"not the backup's any more"),
    ]
    held = [
        ("var/log/app.log.2", "var/log/app.log.1"),
        ("var/log/b.log", None),
        ("var/log/sub/b-copy.log", "var/log/b.log"),
    ]
    s3, doc = _backup(FINAL_TREE, segment, held)
    report = _restore(s3, doc, tmp_path / "dest")

    assert _files(tmp_path / "dest") == {
        "var/log/live.log": b"live",
        "var/log/app.log.2": b"rotated since",
        "var/log/b.log": b"one content, two names",
        "var/log/sub/b-copy.log": b"one content, two names",
    }
    assert report.files == 4 and report.bytes == 4 + 13 + 2 * 22
    assert report.written is not None
    for name, body in _files(tmp_path / "dest").items():
        path = tmp_path / "dest" / name
        assert report.written[name.encode()].sha256 == hashlib.sha256(body).hexdigest()
        assert report.written[name.encode()].ino == path.stat().st_ino
        assert path.stat().st_mtime == OLD and path.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "dest" / "var" / "log").stat().st_mode & 0o777 == 0o750


def test_a_member_the_segment_holds_twice_restores_as_its_last_copy(tmp_path: Path) -> None:
    segment: list[Member] = [("a.log", "file", b"first"), ("a.log", "file", b"second, last")]
    s3, doc = _backup([("keep", "file", b"k")], segment, [("a.log", None)])
    _restore(s3, doc, tmp_path / "dest")
    assert _files(tmp_path / "dest") == {"keep": b"k", "a.log": b"second, last"}


def test_a_one_file_segment_of_an_older_agent_restores_its_only_file_under_the_new_name(
    tmp_path: Path,
) -> None:
    # The entry does not name its member, as an older agent wrote it after a rotation.
    s3, doc = _backup([("keep", "file", b"k")], [("app.log", "file", b"shipped")], [("app.log", None)])
    doc["entries"][0]["path"] = "app.log.1"
    _restore(s3, doc, tmp_path / "dest")
    assert _files(tmp_path / "dest") == {"keep": b"k", "app.log.1": b"shipped"}


def _refused(s3: FakeS3, doc: dict[str, Any], dest: Path, kind: type[Exception]) -> str:
    with pytest.raises(kind) as err:
        _restore(s3, doc, dest)
    assert not dest.exists()
    return str(err.value)


def test_a_file_the_final_archive_holds_too_is_refused(tmp_path: Path) -> None:
    s3, doc = _backup([("a.log", "file", b"final")], [("a.log", "file", b"seg")], [("a.log", None)])
    msg = _refused(s3, doc, tmp_path / "dest", RestoreError)
    assert "'a.log' is both in the archive and in a segment" in msg


@pytest.mark.parametrize("name", ["var/link", "var/link/passwd"])
def test_a_held_file_at_or_below_a_symlink_of_the_final_archive_is_refused(tmp_path: Path, name: str) -> None:
    final: list[Member] = [("var", "dir", b""), ("var/link", "symlink", ".")]
    s3, doc = _backup(final, [(name, "file", b"evil")], [(name, None)])
    with pytest.raises((RestoreError, UnsafeArchive)) as err:
        _restore(s3, doc, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert "'var/link" in str(err.value), err.value


@pytest.mark.parametrize("case", ["cut", "tar bytes", "fifo", "absolute", "missing member"])
def test_a_broken_segment_fails_in_one_line_naming_it_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    segment: list[Member] = [("a.log", "file", b"x" * 5000), ("b.log", "file", b"y" * 100)]
    if case == "fifo":
        segment.append(("pipe", "fifo", b""))
    if case == "absolute":
        segment.append(("/etc/passwd", "file", b"root::0:0"))
    held: list[tuple[str, str | None]] = [("a.log", None), ("b.log", None)]
    s3, doc = _backup([("keep", "file", b"k")], segment, held)
    if case == "cut":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(s3.objects[SEG])).read()
        s3.objects[SEG] = zstandard.ZstdCompressor().compress(raw[:2048])
    if case == "tar bytes":
        doc["segments"][0]["tar_bytes"] += 512
    if case == "missing member":
        doc["entries"][1]["path"] = "c.log"
    kind = UnsafeArchive if case in ("fifo", "absolute") else RestoreError
    msg = _refused(s3, doc, tmp_path / "dest", kind)
    assert msg.startswith(f"segment s3://{BUCKET}/{SEG}: "), msg
    assert "\n" not in msg
