"""A format-2 final manifest, written from the walk's held files, expands back into exactly
the entries that a format-1 manifest listed: one per held file, naming its segment, renamed
files under their new name with their member in the segment. Anything else fails, naming
the segment. The S3 reader is a fake of listing.S3Reader."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fakes import client_error

from instance_agent import manifest, manifest_check, segrefs
from instance_agent.manifest import ArchiveReport, Held
from instance_agent.manifest_check import UnsafeManifest
from instance_agent.shiprecord import FileId, Shipped, full_digest, tail_digest
from instance_agent.shipstate import Ledger

INSTANCE = "i-0123456789abcdef0"
PREFIX = f"logs/web/{INSTANCE}/"
FINAL = f"{PREFIX}20260101T000000Z.tar.zst"
SEG = f"{PREFIX}segments/a.log.3files-0123456789abcdef01234567.tar.zst"


class FakeS3:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        raise AssertionError("not listed")

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        self.gets.append(kwargs["Key"])
        if kwargs["Key"] not in self.objects:
            raise client_error("NoSuchKey", "no such key", 404)
        return {"Body": io.BytesIO(self.objects[kwargs["Key"]])}


def _digest(name: str) -> str:
    return hashlib.sha256(b"content of " + name.encode()).hexdigest()


NAMES = ["var/log/a.log", "var/log/b.log", "var/log/c.log"]


def _segment_manifest(key: str = SEG, names: list[str] = NAMES) -> bytes:
    entries = [
        {"path": n, "type": "file", "size": 10 + i, "mtime": 1.0, "mode": "0644", "sha256": _digest(n)}
        for i, n in enumerate(names)
    ]
    shipped = [{"path": base64.b64encode(b"/" + n.encode()).decode()} for n in names]
    doc = {"format": 1, "key": key, "segment_of": INSTANCE, "entries": entries, "shipped": shipped}
    return json.dumps(doc).encode()


def _final(held: list[tuple[str, str]], segment_files: int = 3) -> dict[str, Any]:
    """The final manifest when the walk found `held`: (path now, name when shipped)."""
    report = ArchiveReport()
    for now, shipped in held:
        member = None if now == shipped else shipped.encode()
        report.hold(now.encode(), 1, Held(SEG, _digest(shipped), member, segment_files))
    parts = manifest.build(
        report,
        key=FINAL,
        compression="zstd",
        agent_version="t",
        compressed_bytes=0,
        journal=None,
        segments=[{"key": SEG, "tar_bytes": 10240}],
        instance_id=INSTANCE,
    )
    doc: dict[str, Any] = json.loads(b"".join(bytes(p) for p in parts))
    return doc


def _expanded(doc: dict[str, Any], objects: dict[str, bytes] | None = None) -> list[tuple[str, str | None]]:
    s3 = FakeS3(objects if objects is not None else {SEG + ".manifest.json": _segment_manifest()})
    out = segrefs.expand(s3, "b", FINAL, doc)
    assert all(e["object"] == SEG for e in out["entries"])
    return sorted((e["path"], e.get("member")) for e in out["entries"])


def test_all_held_names_no_file_and_expands_to_every_shipped_file() -> None:
    doc = _final([(n, n) for n in NAMES])
    assert doc["format"] == 2 and doc["entries"] == [manifest.FORMAT_GUARD]
    assert "members" not in doc["segments"][0] and doc["segments"][0]["held"] == 3
    assert _expanded(doc) == [(n, None) for n in NAMES]


def test_a_file_gone_since_names_the_held_ones_and_restores_only_those() -> None:
    doc = _final([("var/log/a.log", "var/log/a.log"), ("var/log/c.log", "var/log/c.log")])
    assert [m["path"] for m in doc["segments"][0]["members"]] == ["var/log/a.log", "var/log/c.log"]
    assert _expanded(doc) == [("var/log/a.log", None), ("var/log/c.log", None)]


def test_renamed_and_hard_linked_files_come_back_under_every_name() -> None:
    held = [("var/log/a.log.1", "var/log/a.log"), ("var/log/b.log", "var/log/b.log")]
    held += [("var/log/b-link.log", "var/log/b.log"), ("var/log/c.log", "var/log/c.log")]
    doc = _final(held)
    assert len(doc["segments"][0]["members"]) == 4  # b.log twice: named one by one
    assert _expanded(doc) == [
        ("var/log/a.log.1", "var/log/a.log"),
        ("var/log/b-link.log", "var/log/b.log"),
        ("var/log/b.log", None),
        ("var/log/c.log", None),
    ]


def test_an_older_ledger_line_without_the_count_names_its_files() -> None:
    doc = _final([(n, n) for n in NAMES], segment_files=0)
    assert len(doc["segments"][0]["members"]) == 3
    assert _expanded(doc) == [(n, None) for n in NAMES]


def test_a_format_1_manifest_is_returned_as_it_is() -> None:
    doc = {"format": 1, "segments": [{"key": SEG}], "entries": [{"path": "x", "object": SEG}]}
    s3 = FakeS3({})
    assert segrefs.expand(s3, "b", FINAL, doc) == doc and s3.gets == []


@pytest.mark.parametrize(
    "case",
    ["manifest missing", "another digest", "a file more", "another segment's manifest", "another instance"],
)
def test_a_segment_manifest_that_does_not_match_fails_naming_the_segment(case: str) -> None:
    doc = _final([(n, n) for n in NAMES])
    seg = json.loads(_segment_manifest())
    if case == "another digest":
        seg["entries"][1]["sha256"] = "0" * 64
    elif case == "a file more":
        seg = json.loads(_segment_manifest(names=[*NAMES, "var/log/d.log"]))
    elif case == "another segment's manifest":
        seg["key"] = SEG.replace("a.log", "z.log")
    elif case == "another instance":
        seg["segment_of"] = "i-0fedcba9876543210"
    objects = {} if case == "manifest missing" else {SEG + ".manifest.json": json.dumps(seg).encode()}
    with pytest.raises(segrefs.SegmentMismatch) as err:
        _expanded(doc, objects)
    assert f"segment s3://b/{SEG}" in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "logs/web/i-0fedcba9876543210/segments/a.log.1-2-3.tar.zst",  # a neighbour's
        f"{PREFIX}20251231T000000Z.tar.zst",  # a backup, not a segment
    ],
)
def test_a_segment_key_not_of_this_instance_is_refused_before_anything_is_read(key: str) -> None:
    doc = _final([(n, n) for n in NAMES])
    doc["segments"][0]["key"] = key
    s3 = FakeS3({key + ".manifest.json": _segment_manifest(key)})
    with pytest.raises(UnsafeManifest, match="refusing the manifest: it names segment"):
        segrefs.expand(s3, "b", FINAL, doc)
    assert s3.gets == []


def test_a_forgotten_file_after_compaction_still_names_the_held_ones(tmp_path: Path) -> None:
    """The segment's shipped count survives the ledger's compaction: after one of its three
    files is forgotten (rotated away), the final manifest names the two it still holds
    instead of promising all three, and the expansion restores exactly those two."""
    logs = []
    for name in ("a.log", "b.log", "c.log"):
        path = tmp_path / "var" / "log" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"line of " + name.encode() + b"\n" * 40)
        logs.append(path)
    recs = []
    for path in logs:
        st = os.lstat(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            whole, tail = full_digest(fd, st.st_size), tail_digest(fd, st.st_size)
        finally:
            os.close(fd)
        recs.append(Shipped(FileId.of(st), os.fsencode(path), whole, tail, SEG, 10240, 99, st.st_ctime_ns))
    state = str(tmp_path / "state")
    ledger = Ledger.load(state, INSTANCE)
    ledger.add_segment(recs)
    logs[1].unlink()
    ledger.keep_only({(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in (logs[0], logs[2])})
    ledger.compact()
    ledger.close()

    again = Ledger.load(state, INSTANCE)  # the termination job
    report = ArchiveReport()
    for path in (logs[0], logs[2]):
        name = os.fsencode(path)
        held = again.held(name, os.lstat(path), None, name)
        assert held is not None
        report.hold(name.lstrip(b"/"), path.stat().st_size, held)
    (seg,) = [{**s, **report.held[s["key"]].to_json()} for s in again.segments()]
    assert [m["path"] for m in seg["members"]] == [str(logs[0]).lstrip("/"), str(logs[2]).lstrip("/")]

    names = [str(p).lstrip("/") for p in logs]
    entries = [
        {"path": n, "type": "file", "size": r.fid.size, "mode": "0644", "sha256": r.sha256}
        for n, r in zip(names, recs)
    ]
    shipped = [r.file_json() for r in recs]
    sdoc = {"format": 1, "key": SEG, "segment_of": INSTANCE, "entries": entries, "shipped": shipped}
    doc = {"format": 2, "instance_id": INSTANCE, "segments": [seg], "entries": []}
    s3 = FakeS3({SEG + ".manifest.json": json.dumps(sdoc).encode()})
    out = segrefs.expand(s3, "b", FINAL, doc)
    assert [e["path"] for e in out["entries"]] == [names[0], names[2]]


def test_a_reader_that_predates_format_2_refuses_it_instead_of_restoring_half() -> None:
    """A reader that knew only format 1 restored the archive's own entries and said
    `verified`, every shipped file missing. The guard entry names an object no segment can
    be: such a reader's manifest check refuses it in one line that says what to do."""
    doc = _final([(n, n) for n in NAMES])
    with pytest.raises(manifest_check.UnsafeManifest, match="restore it with a newer instance-agent"):
        manifest_check.check(FINAL, doc)
    expanded = segrefs.expand(FakeS3({SEG + ".manifest.json": _segment_manifest()}), "b", FINAL, doc)
    manifest_check.check(FINAL, expanded)  # a format-2 reader drops the guard
    assert not [e for e in expanded["entries"] if manifest.is_guard(e)]
