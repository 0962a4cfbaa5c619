"""ledgerseed: what a lost ledger takes back from S3, and what it refuses."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from instance_agent import ledgerseed
from instance_agent.shiprecord import FileId, Shipped
from instance_agent.shipstate import Ledger

PREFIX = "backups/web/i-0abc-segments/"
INSTANCE = "i-0abc"


class FakeS3:
    """Objects in memory."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        keys = sorted(k for k in self.objects if k.startswith(kwargs["Prefix"]))
        return {"Contents": [{"Key": k, "Size": len(self.objects[k])} for k in keys], "IsTruncated": False}

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return {"Body": io.BytesIO(self.objects[kwargs["Key"]])}


def shipped_line(path: Path, segment: str) -> dict[str, Any]:
    st = os.lstat(path)
    rec = Shipped(FileId.of(st), os.fsencode(path), "a" * 64, "b" * 64, segment, 1, 1, st.st_ctime_ns)
    return rec.file_json()


def manifest(segment: str, lines: list[dict[str, Any]], instance: str = INSTANCE) -> bytes:
    doc = {"key": segment, "segment_of": instance, "totals": {"tar_bytes": 10, "compressed_bytes": 5}}
    return json.dumps({**doc, "shipped": lines}).encode()


def test_unchanged_files_are_taken_back_and_the_rest_refused(tmp_path: Path) -> None:
    kept, changed, gone = tmp_path / "kept.log", tmp_path / "changed.log", tmp_path / "gone.log"
    for p in (kept, changed, gone):
        p.write_bytes(b"x" * 100)
    seg = PREFIX + "kept.log.1files.tar.zst"
    lines = [shipped_line(p, seg) for p in (kept, changed, gone)]
    changed.write_bytes(b"y" * 101)
    gone.unlink()
    other = PREFIX + "other.tar.zst"
    objects = {
        seg: b"tar",
        seg + ".manifest.json": manifest(seg, lines),
        # Another instance's manifest, one that names an object not its own, and one whose
        # segment is missing: none of them is trusted.
        PREFIX + "a.tar.zst.manifest.json": manifest(PREFIX + "a.tar.zst", lines, instance="i-0other"),
        PREFIX + "b.tar.zst": b"tar",
        PREFIX + "b.tar.zst.manifest.json": manifest(seg, lines),
        other + ".manifest.json": manifest(other, [shipped_line(kept, other)]),
    }
    ledger = Ledger(None, INSTANCE)
    assert ledgerseed.seed(ledger, FakeS3(objects), "bk", PREFIX, INSTANCE) == (1, 1)
    rec = ledger.get(FileId.of(os.lstat(kept)))
    assert rec is not None and rec.key == seg
    assert ledger.get(FileId.of(os.lstat(changed))) is None
    assert ledger.totals()[0] == 1


class DeniedRead(FakeS3):
    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "GetObject")


def test_an_s3_refusal_ends_the_seeding_and_nothing_is_claimed(tmp_path: Path) -> None:
    kept = tmp_path / "kept.log"
    kept.write_bytes(b"x")
    seg = PREFIX + "kept.tar.zst"
    objects = {seg: b"tar", seg + ".manifest.json": manifest(seg, [shipped_line(kept, seg)])}
    ledger = Ledger(None, INSTANCE)
    assert ledgerseed.seed(ledger, DeniedRead(objects), "bk", PREFIX, INSTANCE) == (0, 0)
    assert ledger.totals()[0] == 0
